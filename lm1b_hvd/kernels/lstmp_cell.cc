// The elementwise part of one LSTM time step, forward and backward, each as one kernel.
//
// Composed of TensorFlow ops, a step's gate arithmetic is ~10 ops forward and ~15 backward,
// each a pass over [batch, 4 * state] with its own scheduling cost: for the demo model more
// time than its arithmetic. lm1b_hvd/ops.py runs the matmuls and calls these for the rest;
// the math is ops.py's composed cell (its tests compare the two). CPU only: on a GPU, or
// under XLA, ops.py composes the cell from TensorFlow ops.
//
// LstmpCell: gates = input_gates + recurrent_gates, in the order i, j, f, o;
//   c = sigmoid(f + forget_bias) * c_prev + sigmoid(i) * tanh(j), memory = sigmoid(o) * tanh(c).
//   Also returns the four activations and tanh(c), which the backward reads.
// LstmpCellGrad: from d_c (the gradient reaching c from later steps) and d_memory, the
//   gradient of the gates before their activations and the one reaching c_prev.
#define EIGEN_USE_THREADS
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "unsupported/Eigen/CXX11/Tensor"

namespace lm1b_hvd {
using namespace tensorflow;
using shape_inference::InferenceContext;
using Row = Eigen::Map<const Eigen::ArrayXf>;
using MutableRow = Eigen::Map<Eigen::ArrayXf>;

// sigmoid(x) as 0.5 * tanh(x / 2) + 0.5: Eigen's vectorized tanh is ~1.8x faster than its
// logistic under AVX2, and the result is within 1.3e-7 of the exact sigmoid.
template <typename Expression>
auto Sigmoid(const Expression& x) {
  return (x * 0.5f).tanh() * 0.5f + 0.5f;
}

REGISTER_OP("LstmpCell")
    .Input("input_gates: float")
    .Input("recurrent_gates: float")
    .Input("c_prev: float")
    .Attr("forget_bias: float")
    .Output("c: float")
    .Output("memory: float")
    .Output("activations: float")
    .Output("tanh_c: float")
    .SetShapeFn([](InferenceContext* ctx) {
      ctx->set_output(0, ctx->input(2));
      ctx->set_output(1, ctx->input(2));
      ctx->set_output(2, ctx->input(0));
      ctx->set_output(3, ctx->input(2));
      return OkStatus();
    });

REGISTER_OP("LstmpCellGrad")
    .Input("activations: float")
    .Input("tanh_c: float")
    .Input("c_prev: float")
    .Input("d_c: float")
    .Input("d_memory: float")
    .Output("d_gates: float")
    .Output("d_c_prev: float")
    .SetShapeFn([](InferenceContext* ctx) {
      ctx->set_output(0, ctx->input(0));
      ctx->set_output(1, ctx->input(2));
      return OkStatus();
    });

// Whether `gates` is [batch, 4 * state] for a cell state `c` [batch, state].
bool GatesMatch(const Tensor& gates, const Tensor& c) {
  return c.dims() == 2 && gates.dims() == 2 && gates.dim_size(0) == c.dim_size(0) &&
         gates.dim_size(1) == 4 * c.dim_size(1);
}

class LstmpCellOp : public OpKernel {
 public:
  explicit LstmpCellOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("forget_bias", &forget_bias_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& input_gates = ctx->input(0);
    const Tensor& recurrent_gates = ctx->input(1);
    const Tensor& c_prev = ctx->input(2);
    OP_REQUIRES(ctx, GatesMatch(input_gates, c_prev) && recurrent_gates.shape() == input_gates.shape(),
                errors::InvalidArgument("LstmpCell: gates ", input_gates.shape().DebugString(), " and ",
                                        recurrent_gates.shape().DebugString(), " for a cell state ",
                                        c_prev.shape().DebugString()));
    const int64_t batch = c_prev.dim_size(0), state = c_prev.dim_size(1);
    Tensor *c, *memory, *activations, *tanh_c;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, c_prev.shape(), &c));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, c_prev.shape(), &memory));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, input_gates.shape(), &activations));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(3, c_prev.shape(), &tanh_c));
    const float* in = input_gates.flat<float>().data();
    const float* rec = recurrent_gates.flat<float>().data();
    const float* cp = c_prev.flat<float>().data();
    float* c_out = c->flat<float>().data();
    float* m_out = memory->flat<float>().data();
    float* act = activations->flat<float>().data();
    float* tc_out = tanh_c->flat<float>().data();
    const float forget_bias = forget_bias_;
    auto rows = [&](int64_t first, int64_t last) {
      for (int64_t r = first; r < last; ++r) {
        const float* in_r = in + r * 4 * state;
        const float* rec_r = rec + r * 4 * state;
        float* act_r = act + r * 4 * state;
        MutableRow i(act_r, state), j(act_r + state, state), f(act_r + 2 * state, state),
            o(act_r + 3 * state, state);
        i = Sigmoid(Row(in_r, state) + Row(rec_r, state));
        j = (Row(in_r + state, state) + Row(rec_r + state, state)).tanh();
        f = Sigmoid(Row(in_r + 2 * state, state) + Row(rec_r + 2 * state, state) + forget_bias);
        o = Sigmoid(Row(in_r + 3 * state, state) + Row(rec_r + 3 * state, state));
        MutableRow c_r(c_out + r * state, state), tc_r(tc_out + r * state, state);
        c_r = f * Row(cp + r * state, state) + i * j;
        tc_r = c_r.tanh();
        MutableRow(m_out + r * state, state) = o * tc_r;
      }
    };
    // Per row ~3 cycles a gate (measured): the demo model's [32, 4 * 256] runs on one thread,
    // where splitting it costs more than it saves; the default's [128, 4 * 2048] on all.
    const double row_bytes = sizeof(float) * state;
    ctx->eigen_cpu_device().parallelFor(batch, Eigen::TensorOpCost(9 * row_bytes, 7 * row_bytes, 12 * state), rows);
  }

 private:
  float forget_bias_;
};

class LstmpCellGradOp : public OpKernel {
 public:
  explicit LstmpCellGradOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& activations = ctx->input(0);
    const Tensor& tanh_c = ctx->input(1);
    const Tensor& c_prev = ctx->input(2);
    const Tensor& d_c = ctx->input(3);
    const Tensor& d_memory = ctx->input(4);
    OP_REQUIRES(ctx, GatesMatch(activations, c_prev) && tanh_c.shape() == c_prev.shape() &&
                         d_c.shape() == c_prev.shape() && d_memory.shape() == c_prev.shape(),
                errors::InvalidArgument("LstmpCellGrad: activations ", activations.shape().DebugString(),
                                        " do not match a cell state ", c_prev.shape().DebugString()));
    const int64_t batch = c_prev.dim_size(0), state = c_prev.dim_size(1);
    Tensor *d_gates, *d_c_prev;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, activations.shape(), &d_gates));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, c_prev.shape(), &d_c_prev));
    const float* act = activations.flat<float>().data();
    const float* tc = tanh_c.flat<float>().data();
    const float* cp = c_prev.flat<float>().data();
    const float* dc_in = d_c.flat<float>().data();
    const float* dm_in = d_memory.flat<float>().data();
    float* dg = d_gates->flat<float>().data();
    float* dcp = d_c_prev->flat<float>().data();
    auto rows = [&](int64_t first, int64_t last) {
      for (int64_t r = first; r < last; ++r) {
        const float* act_r = act + r * 4 * state;
        Row i(act_r, state), j(act_r + state, state), f(act_r + 2 * state, state), o(act_r + 3 * state, state);
        Row tanh_c_r(tc + r * state, state), d_memory_r(dm_in + r * state, state);
        float* dg_r = dg + r * 4 * state;
        MutableRow d_cell(dcp + r * state, state);  // d loss / d c, then times f
        d_cell = Row(dc_in + r * state, state) + d_memory_r * o * (1.0f - tanh_c_r.square());
        MutableRow(dg_r, state) = d_cell * j * i * (1.0f - i);
        MutableRow(dg_r + state, state) = d_cell * i * (1.0f - j.square());
        MutableRow(dg_r + 2 * state, state) = d_cell * Row(cp + r * state, state) * f * (1.0f - f);
        MutableRow(dg_r + 3 * state, state) = d_memory_r * tanh_c_r * o * (1.0f - o);
        d_cell *= f;
      }
    };
    const double row_bytes = sizeof(float) * state;
    ctx->eigen_cpu_device().parallelFor(batch, Eigen::TensorOpCost(9 * row_bytes, 5 * row_bytes, 6 * state), rows);
  }
};

REGISTER_KERNEL_BUILDER(Name("LstmpCell").Device(DEVICE_CPU), LstmpCellOp);
REGISTER_KERNEL_BUILDER(Name("LstmpCellGrad").Device(DEVICE_CPU), LstmpCellGradOp);

}  // namespace lm1b_hvd
