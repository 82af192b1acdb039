"""How the model computes on this device, chosen once when the model is made.

The math is fixed by the hparams; how it runs is not. `--hpconfig kernels=...` picks:
- `portable`: TensorFlow ops only (ops.py), the per-step weights as stored: exactly what a GPU
  runs, and what XLA compiles;
- `cpu`: lm1b_hvd's CPU kernels for the LSTM cell and the sampled softmax (cpu_kernels.py), and
  the per-step weights transposed where oneDNN runs AVX2 kernels;
- `auto` (the default): `cpu` on a CPU where the kernels are built and XLA is off, else
  `portable`.
Both give the same numbers to rounding (tests/test_kernels_agree.py trains the demo both
ways); a checkpoint resumes under either.
"""
import dataclasses

import tensorflow as tf

from lm1b_hvd import console, devices
from lm1b_hvd.model import cpu_kernels, ops

KERNELS = ("auto", "cpu", "portable")
# The LSTM layer runs its window as this many time chunks, so that one chunk's big matmuls run
# beside the next chunk's per-step ones; more chunks add one weight-gradient sum each.
TIME_CHUNKS = 2
COMPUTE_DTYPES = {"fp32": tf.float32, "bf16": tf.bfloat16, "fp16": tf.float16}


class PlanError(console.UserError):
    """A `kernels` choice this device or these hparams cannot run."""


@dataclasses.dataclass(frozen=True)
class DeviceTraits:
    """What the choice depends on besides the hparams."""
    gpu: bool  # TensorFlow trains on a GPU here
    onednn_avx512: bool  # oneDNN's fp32 matmuls run AVX-512 kernels (not capped below)
    cpu_kernels_built: bool  # setup.py built lm1b_hvd.model._kernels

    @classmethod
    def detect(cls):
        return cls(gpu=devices.on_gpu(), onednn_avx512=devices.onednn_avx512(),
                   cpu_kernels_built=cpu_kernels.built())


@dataclasses.dataclass(frozen=True)
class ComputePlan:
    kernels: str  # "cpu" or "portable": what `auto` resolved to
    cell: str  # "fused" (cpu_kernels.FusedCell) or "composed" (ops.ComposedCell)
    softmax: str  # the sampled softmax's candidates: "fused" (a CPU kernel) or "composed" (TF ops)
    step_weights: str  # the per-step matmuls' weights: "stored" or "transposed"
    time_chunks: int
    compute_dtype: str  # of the matmul operands: fp32, bf16 or fp16
    why: str = ""  # what decided it

    @property
    def dtype(self):
        return COMPUTE_DTYPES[self.compute_dtype]

    def layer_options(self):
        """The keywords of ops.lstmp_layer for this plan."""
        return dict(cell=cpu_kernels.FusedCell if self.cell == "fused" else ops.ComposedCell,
                    step_weights=(cpu_kernels.TransposedStepWeights if self.step_weights == "transposed"
                                  else ops.StoredStepWeights),
                    compute_dtype=self.dtype)

    def softmax_options(self):
        """The keywords of ops.sampled_cross_entropy for this plan."""
        return dict(candidate_softmax=(cpu_kernels.fused_candidate_softmax if self.softmax == "fused"
                                       else ops.composed_candidate_softmax),
                    compute_dtype=self.dtype)

    def describe(self):
        return (f"compute plan: kernels={self.kernels} ({self.why}): LSTM cell {self.cell}, sampled softmax "
                f"{self.softmax}, per-step weights {self.step_weights}, {self.time_chunks} time chunks, "
                f"{self.compute_dtype} matmuls")


def choose(hps, device=None):
    """The plan for `hps` (its `kernels`, `xla` and `precision`) on `device` (detected when None)."""
    device = device or DeviceTraits.detect()
    kernels, why = hps.kernels, "asked for"
    if kernels == "auto":
        if device.gpu:
            kernels, why = "portable", "auto: a GPU"
        elif hps.xla:
            kernels, why = "portable", "auto: XLA compiles TensorFlow ops only"
        elif not device.cpu_kernels_built:
            kernels, why = "portable", "auto: the CPU kernels are not built"
        else:
            kernels, why = "cpu", "auto: a CPU"
    elif kernels == "cpu":
        if device.gpu:
            raise PlanError("hparam 'kernels=cpu': lm1b_hvd's CPU kernels cannot run on the GPU this rank trains on; "
                            "use kernels=auto or kernels=portable")
        if hps.xla:
            raise PlanError("hparam 'kernels=cpu' cannot run under xla=true (XLA compiles TensorFlow ops only); "
                            "use kernels=auto or kernels=portable")
        cpu_kernels.load()  # a one-line error now, not at the first trace, when they are missing
    if kernels == "cpu":
        transposed = not device.onednn_avx512
        why += "; oneDNN AVX2" if transposed else "; oneDNN AVX-512"
        return ComputePlan("cpu", "fused", "fused", "transposed" if transposed else "stored", TIME_CHUNKS,
                           hps.precision, why)
    return ComputePlan("portable", "composed", "composed", "stored", TIME_CHUNKS, hps.precision, why)
