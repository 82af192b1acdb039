"""The compute plan: chosen once from the hparams and the device, every choice named."""
import pytest

from lm1b_hvd import console, hparams
from lm1b_hvd.model import compute_plan, cpu_kernels
from lm1b_hvd.model.compute_plan import DeviceTraits

AVX512_CPU = DeviceTraits(gpu=False, onednn_avx512=True, cpu_kernels_built=True)
AVX2_CPU = DeviceTraits(gpu=False, onednn_avx512=False, cpu_kernels_built=True)
GPU = DeviceTraits(gpu=True, onednn_avx512=True, cpu_kernels_built=False)
CPU_WITHOUT_KERNELS = DeviceTraits(gpu=False, onednn_avx512=False, cpu_kernels_built=False)


def choose(device, **overrides):
    return compute_plan.choose(hparams.HParams(**overrides), device)


@pytest.mark.parametrize("device, overrides, expected", [
    (AVX512_CPU, {}, ("cpu", "fused", "fused", "stored", "auto: a CPU; oneDNN AVX-512")),
    (AVX2_CPU, {}, ("cpu", "fused", "fused", "transposed", "auto: a CPU; oneDNN AVX2")),
    (GPU, {}, ("portable", "composed", "composed", "stored", "auto: a GPU")),
    (AVX2_CPU, {"xla": True}, ("portable", "composed", "composed", "stored", "auto: XLA compiles TensorFlow ops only")),
    (CPU_WITHOUT_KERNELS, {}, ("portable", "composed", "composed", "stored", "auto: the CPU kernels are not built")),
    (AVX2_CPU, {"kernels": "portable"}, ("portable", "composed", "composed", "stored", "asked for")),
    (AVX2_CPU, {"kernels": "cpu"}, ("cpu", "fused", "fused", "transposed", "asked for; oneDNN AVX2")),
    (GPU, {"kernels": "portable", "xla": True}, ("portable", "composed", "composed", "stored", "asked for")),
])
def test_auto_picks_by_device_and_each_choice_is_named(device, overrides, expected):
    plan = choose(device, **overrides)
    assert (plan.kernels, plan.cell, plan.softmax, plan.step_weights, plan.why) == expected
    assert plan.time_chunks == compute_plan.TIME_CHUNKS and plan.compute_dtype == "fp32"
    assert plan.describe().startswith(f"compute plan: kernels={expected[0]} ({expected[4]}): LSTM cell {expected[1]}")


def test_the_plan_carries_the_precision():
    plan = choose(AVX512_CPU, precision="bf16")
    assert plan.compute_dtype == "bf16" and plan.describe().endswith("2 time chunks, bf16 matmuls")


@pytest.mark.parametrize("device, overrides, message", [
    (GPU, {"kernels": "cpu"}, "hparam 'kernels=cpu': lm1b_hvd's CPU kernels cannot run on the GPU"),
    (AVX2_CPU, {"kernels": "cpu", "xla": True}, "hparam 'kernels=cpu' cannot run under xla=true"),
])
def test_kernels_cpu_where_they_cannot_run_is_a_one_line_error(device, overrides, message):
    with pytest.raises(compute_plan.PlanError, match=message):
        choose(device, **overrides)


def test_kernels_cpu_without_the_built_kernels_names_the_fix(monkeypatch):
    def missing():
        raise console.UserError("lm1b_hvd's CPU kernels are not built")
    monkeypatch.setattr(cpu_kernels, "load", missing)
    with pytest.raises(console.UserError, match="not built"):
        choose(CPU_WITHOUT_KERNELS, kernels="cpu")


def test_an_unknown_kernels_value_is_refused_by_name():
    with pytest.raises(hparams.HParamsError, match="hparam 'kernels' expects one of auto, cpu, portable, got 'gpu'"):
        hparams.build("demo", "kernels=gpu")


def test_a_run_trained_with_the_cpu_kernels_is_read_with_this_machines_plan(tiny_corpus, tmp_path, monkeypatch):
    """evaluate, score, sample and export choose their own plan: a run trained with
    kernels=cpu is read on a GPU node, where those kernels cannot run."""
    from lm1b_hvd.data import dataset, vocab
    from lm1b_hvd.run import checkpoints, weights as weights_lib
    from tests.helpers import TINY
    corpus = tiny_corpus
    words = vocab.load(str(corpus / dataset.VOCAB_FILE))
    trained_with = hparams.build("demo", TINY + ",kernels=cpu")
    checkpoints.check_or_write_hparams(str(tmp_path / "log"), trained_with, len(words), write=True)
    monkeypatch.setattr(DeviceTraits, "detect", classmethod(lambda cls: GPU))
    weights = weights_lib.run_weights(str(tmp_path / "log"), str(corpus))
    assert weights.hps.kernels == "cpu" and weights.state.model.plan.kernels == "portable"
