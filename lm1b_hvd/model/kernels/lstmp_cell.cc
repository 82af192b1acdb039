// The elementwise part of one LSTM time step, forward and backward, each as one kernel.
//
// Composed of TensorFlow ops, a step's gate arithmetic is ~10 ops forward and ~15 backward,
// each a pass over [batch, 4 * state] with its own scheduling cost: for the demo model more
// time than its arithmetic. lm1b_hvd/ops.py runs the matmuls and, through cpu_kernels.FusedCell,
// calls these for the rest; the math is ops.cell_update's (tests/test_ops.py compares the two).
// CPU only: `kernels=portable` (a GPU, XLA) composes the cell from TensorFlow ops instead.
//
// Both ops work on a window [steps, batch, 4 * state] over the layer's steps, which they take
// and return with row block `step` rewritten, in the gates' order i, j, f, o:
// LstmpCell: gates = the window's step (the input half of the gates) + recurrent_gates;
//   c = sigmoid(f + forget_bias) * c_prev + sigmoid(i) * tanh(j), memory = sigmoid(o) * tanh(c).
//   Writes the four activations, which the backward reads, over the input half in the window,
//   and returns c, memory and tanh(c).
// LstmpCellGrad: from d_c (the gradient reaching c from later steps) and d_memory, the
//   gradient reaching c_prev, and the gradient of the gates before their activations, written
//   over the step's activations in the window.
//
// The window passes from op to op and is written in place (TensorFlow hands an op an input
// buffer that nothing else holds): the input half of the gates, one matmul over all steps,
// becomes the activations and then the gates' gradients, which the weight gradients' matmuls
// read as one matrix: no buffer of activations beside the gates', and no stacking of the
// steps' gradients after the loop (a copy of the whole window). Where the window is shared
// after all (eager calls), an op copies it first and leaves the caller's intact.

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

// sigmoid(x) as 0.5 * tanh(x / 2) + 0.5: Eigen's vectorized tanh is faster than its logistic
// under AVX2, and the result is within 1.3e-7 of the exact sigmoid.
template <typename Expression>
auto Sigmoid(const Expression& x) {
  return (x * 0.5f).tanh() * 0.5f + 0.5f;
}

REGISTER_OP("LstmpCell")
    .Input("window: float")
    .Input("recurrent_gates: float")
    .Input("c_prev: float")
    .Attr("forget_bias: float")
    .Attr("step: int >= 0")
    .Output("c: float")
    .Output("memory: float")
    .Output("window_out: float")
    .Output("tanh_c: float")
    .SetShapeFn([](InferenceContext* ctx) {
      ctx->set_output(0, ctx->input(2));
      ctx->set_output(1, ctx->input(2));
      ctx->set_output(2, ctx->input(0));
      ctx->set_output(3, ctx->input(2));
      return OkStatus();
    });

REGISTER_OP("LstmpCellGrad")
    .Input("window: float")
    .Input("tanh_c: float")
    .Input("c_prev: float")
    .Input("d_c: float")
    .Input("d_memory: float")
    .Attr("step: int >= 0")
    .Output("window_out: float")
    .Output("d_c_prev: float")
    .SetShapeFn([](InferenceContext* ctx) {
      ctx->set_output(0, ctx->input(0));
      ctx->set_output(1, ctx->input(2));
      return OkStatus();
    });

// Whether `gates` is [batch, 4 * state] for a cell state `c` [batch, state].
bool GatesMatch(const TensorShape& gates, const Tensor& c) {
  return c.dims() == 2 && gates.dims() == 2 && gates.dim_size(0) == c.dim_size(0) &&
         gates.dim_size(1) == 4 * c.dim_size(1);
}

// The op's window input `index`, [steps, batch, 4 * state] for a cell state `c`, as its output
// `output`: the input's own buffer where nothing else holds it, else a copy. Sets `rows` to
// the window's row block `step`.
Status StepOfWindow(OpKernelContext* ctx, int index, int output, int64_t step, const Tensor& c, float** rows) {
  const Tensor& window = ctx->input(index);
  if (window.dims() != 3 || step >= window.dim_size(0) ||
      !GatesMatch(TensorShape({window.dim_size(1), window.dim_size(2)}), c)) {
    return errors::InvalidArgument(ctx->op_kernel().type_string(), ": no step ", step, " for a cell state ",
                                   c.shape().DebugString(), " in a window ", window.shape().DebugString());
  }
  Tensor* out;
  TF_RETURN_IF_ERROR(ctx->forward_input_or_allocate_output({index}, output, window.shape(), &out));
  if (out->data() != window.data()) {
    std::copy_n(window.flat<float>().data(), window.NumElements(), out->flat<float>().data());
  }
  *rows = out->flat<float>().data() + step * window.dim_size(1) * window.dim_size(2);
  return OkStatus();
}

class LstmpCellOp : public OpKernel {
 public:
  explicit LstmpCellOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("forget_bias", &forget_bias_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("step", &step_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& recurrent_gates = ctx->input(1);
    const Tensor& c_prev = ctx->input(2);
    OP_REQUIRES(ctx, GatesMatch(recurrent_gates.shape(), c_prev),
                errors::InvalidArgument("LstmpCell: recurrent gates ", recurrent_gates.shape().DebugString(),
                                        " for a cell state ", c_prev.shape().DebugString()));
    const int64_t batch = c_prev.dim_size(0), state = c_prev.dim_size(1);
    float* gates;  // the step's input half of the gates in, their activations out
    OP_REQUIRES_OK(ctx, StepOfWindow(ctx, 0, 2, step_, c_prev, &gates));
    Tensor *c, *memory, *tanh_c;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, c_prev.shape(), &c));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, c_prev.shape(), &memory));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(3, c_prev.shape(), &tanh_c));
    const float* rec = recurrent_gates.flat<float>().data();
    const float* cp = c_prev.flat<float>().data();
    float* c_out = c->flat<float>().data();
    float* m_out = memory->flat<float>().data();
    float* tc_out = tanh_c->flat<float>().data();
    const float forget_bias = forget_bias_;
    auto rows = [&](int64_t first, int64_t last) {
      for (int64_t r = first; r < last; ++r) {
        const float* rec_r = rec + r * 4 * state;
        float* g = gates + r * 4 * state;
        MutableRow i(g, state), j(g + state, state), f(g + 2 * state, state), o(g + 3 * state, state);
        i = Sigmoid(i + Row(rec_r, state));
        j = (j + Row(rec_r + state, state)).tanh();
        f = Sigmoid(f + Row(rec_r + 2 * state, state) + forget_bias);
        o = Sigmoid(o + Row(rec_r + 3 * state, state));
        MutableRow c_r(c_out + r * state, state), tc_r(tc_out + r * state, state);
        c_r = f * Row(cp + r * state, state) + i * j;
        tc_r = c_r.tanh();
        MutableRow(m_out + r * state, state) = o * tc_r;
      }
    };
    // The cost per row Eigen's parallelFor is told (about 3 cycles a gate): small models' rows
    // run on one thread, where splitting them costs more than it saves; large ones on all.
    const double row_bytes = sizeof(float) * state;
    ctx->eigen_cpu_device().parallelFor(batch, Eigen::TensorOpCost(9 * row_bytes, 7 * row_bytes, 12 * state), rows);
  }

 private:
  float forget_bias_;
  int64_t step_;
};

class LstmpCellGradOp : public OpKernel {
 public:
  explicit LstmpCellGradOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("step", &step_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& tanh_c = ctx->input(1);
    const Tensor& c_prev = ctx->input(2);
    const Tensor& d_c = ctx->input(3);
    const Tensor& d_memory = ctx->input(4);
    OP_REQUIRES(ctx, tanh_c.shape() == c_prev.shape() && d_c.shape() == c_prev.shape() &&
                         d_memory.shape() == c_prev.shape(),
                errors::InvalidArgument("LstmpCellGrad: tanh_c ", tanh_c.shape().DebugString(), ", d_c ",
                                        d_c.shape().DebugString(), " and d_memory ", d_memory.shape().DebugString(),
                                        " for a cell state ", c_prev.shape().DebugString()));
    const int64_t batch = c_prev.dim_size(0), state = c_prev.dim_size(1);
    float* gates;  // the step's activations in, their gradients out
    OP_REQUIRES_OK(ctx, StepOfWindow(ctx, 0, 0, step_, c_prev, &gates));
    Tensor* d_c_prev;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, c_prev.shape(), &d_c_prev));
    const float* tc = tanh_c.flat<float>().data();
    const float* cp = c_prev.flat<float>().data();
    const float* dc_in = d_c.flat<float>().data();
    const float* dm_in = d_memory.flat<float>().data();
    float* dcp = d_c_prev->flat<float>().data();
    auto rows = [&](int64_t first, int64_t last) {
      std::vector<float> i_copy(state);  // d_j reads i after d_i is written over it
      for (int64_t r = first; r < last; ++r) {
        float* g = gates + r * 4 * state;
        MutableRow i(g, state), j(g + state, state), f(g + 2 * state, state), o(g + 3 * state, state);
        Row tanh_c_r(tc + r * state, state), d_memory_r(dm_in + r * state, state);
        MutableRow d_cell(dcp + r * state, state);  // d loss / d c, then times f
        d_cell = Row(dc_in + r * state, state) + d_memory_r * o * (1.0f - tanh_c_r.square());
        o = d_memory_r * tanh_c_r * o * (1.0f - o);
        MutableRow(i_copy.data(), state) = i;
        i = d_cell * j * i * (1.0f - i);
        j = d_cell * Row(i_copy.data(), state) * (1.0f - j.square());
        d_cell *= f;  // d c_prev; then d_f = d c_prev * c_prev * (1 - f)
        f = d_cell * Row(cp + r * state, state) * (1.0f - f);
      }
    };
    const double row_bytes = sizeof(float) * state;
    ctx->eigen_cpu_device().parallelFor(batch, Eigen::TensorOpCost(9 * row_bytes, 5 * row_bytes, 6 * state), rows);
  }

 private:
  int64_t step_;
};

REGISTER_KERNEL_BUILDER(Name("LstmpCell").Device(DEVICE_CPU), LstmpCellOp);
REGISTER_KERNEL_BUILDER(Name("LstmpCellGrad").Device(DEVICE_CPU), LstmpCellGradOp);

}  // namespace lm1b_hvd
