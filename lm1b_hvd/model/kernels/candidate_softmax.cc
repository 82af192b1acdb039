// The sampled softmax's forward over its candidates, one kernel: the biases added to the
// logits, each row's softmax and its log-sum-exp.
//
// Composed of TensorFlow ops this is a bias add, a softmax, and an argmax to read the
// log-sum-exp off the most probable candidate: three passes over [tokens, candidates], each
// out of cache. Here each row (32 KB for 8192 candidates) is read once into the output, then
// its max, exponentials and normalization run in cache. lm1b_hvd/cpu_kernels.py hands it to
// ops.sampled_cross_entropy's forward, whose hand-written backward needs only the
// probabilities and the log-sum-exp; CPU only: `kernels=portable` (a GPU, XLA) runs
// ops.composed_candidate_softmax instead.
//
// CandidateSoftmax: logits [n, k], biases [k] -> probabilities [n, k] (in the logits' buffer
// where nothing else holds it), log_sum_exp [n]: for x = logits + biases,
// log_sum_exp = max(x) + log(sum(exp(x - max(x)))) and probabilities = exp(x - log_sum_exp).

#define EIGEN_USE_THREADS
#include <cmath>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "unsupported/Eigen/CXX11/Tensor"

namespace lm1b_hvd {
using namespace tensorflow;
using shape_inference::InferenceContext;
using Row = Eigen::Map<const Eigen::ArrayXf>;
using MutableRow = Eigen::Map<Eigen::ArrayXf>;

REGISTER_OP("CandidateSoftmax")
    .Input("logits: float")
    .Input("biases: float")
    .Output("probabilities: float")
    .Output("log_sum_exp: float")
    .SetShapeFn([](InferenceContext* ctx) {
      shape_inference::ShapeHandle logits;
      TF_RETURN_IF_ERROR(ctx->WithRank(ctx->input(0), 2, &logits));
      ctx->set_output(0, logits);
      ctx->set_output(1, ctx->Vector(ctx->Dim(logits, 0)));
      return OkStatus();
    });

class CandidateSoftmaxOp : public OpKernel {
 public:
  using OpKernel::OpKernel;

  void Compute(OpKernelContext* ctx) override {
    const Tensor& logits = ctx->input(0);
    const Tensor& biases = ctx->input(1);
    OP_REQUIRES(ctx, logits.dims() == 2 && logits.dim_size(1) > 0 && biases.dims() == 1 &&
                         biases.dim_size(0) == logits.dim_size(1),
                errors::InvalidArgument("CandidateSoftmax: biases ", biases.shape().DebugString(), " for logits ",
                                        logits.shape().DebugString(), " (want [n, k] and [k], k > 0)"));
    const int64_t rows = logits.dim_size(0), columns = logits.dim_size(1);
    Tensor *probabilities, *log_sum_exp;
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({0}, 0, logits.shape(), &probabilities));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({rows}), &log_sum_exp));
    const float* in = logits.flat<float>().data();
    const float* b = biases.flat<float>().data();
    float* out = probabilities->flat<float>().data();
    float* lse = log_sum_exp->flat<float>().data();
    auto softmax_rows = [&](int64_t first, int64_t last) {
      for (int64_t r = first; r < last; ++r) {
        MutableRow x(out + r * columns, columns);
        x = Row(in + r * columns, columns) + Row(b, columns);
        const float max = x.maxCoeff();
        x = (x - max).exp();
        const float sum = x.sum();
        x *= 1.0f / sum;
        lse[r] = max + std::log(sum);
      }
    };
    const double row_bytes = sizeof(float) * columns;
    ctx->eigen_cpu_device().parallelFor(rows, Eigen::TensorOpCost(2 * row_bytes, row_bytes, 20 * columns),
                                        softmax_rows);
  }
};

REGISTER_KERNEL_BUILDER(Name("CandidateSoftmax").Device(DEVICE_CPU), CandidateSoftmaxOp);

}  // namespace lm1b_hvd
