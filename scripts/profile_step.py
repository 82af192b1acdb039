"""Where the training step's time goes: a TensorFlow profiler trace of a few steps, read back.

For each variant (an --hpconfig string) it runs the bench's step on Zipf batches in a process of
its own, traces `--steps` steps after warm-up, and splits each step's wall time by what ran at
each instant, first match wins: a matmul; lm1b_hvd's CPU kernels (the LSTM cell, the
candidates' softmax); gathers, scatters and Adagrad; any other TensorFlow op; nothing. Prints a
table and, with --out, draws it (docs/performance.md's step-time picture).

  .venv/bin/pip install matplotlib
  .venv/bin/python scripts/profile_step.py --preset default --variants kernels=cpu kernels=portable \\
      --out docs/step_time_split.png
  ONEDNN_MAX_CPU_ISA=AVX2 .venv/bin/python scripts/profile_step.py --preset default --variants kernels=cpu
"""
import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

CATEGORIES = ("matmul", "CPU kernels", "gathers, scatters, Adagrad", "other ops", "idle")
KERNEL_TYPES = {"LstmpCell", "LstmpCellGrad", "CandidateSoftmax"}
SPARSE_TYPES = {"GatherV2", "ResourceGather", "GatherNd", "DynamicPartition", "DynamicStitch", "ParallelDynamicStitch",
                "UnsortedSegmentSum", "Unique", "TensorScatterSub", "TensorScatterAdd", "ResourceApplyAdagradV2",
                "ResourceSparseApplyAdagradV2", "ScatterNd"}
BIN_PS = 5_000_000  # 5 us


def category(op_type):
    if "MatMul" in op_type:
        return 0
    if op_type in KERNEL_TYPES:
        return 1
    if op_type in SPARSE_TYPES:
        return 2
    return 3


def read_trace(xplane_path):
    """From the trace's host plane: the steps, (start ps, end ps) of each call of the training
    step on the Python thread, and (category, start ps, end ps) of every TensorFlow op."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2
    space = xplane_pb2.XSpace()
    with open(xplane_path, "rb") as handle:
        space.ParseFromString(handle.read())
    steps, intervals = [], []
    for plane in space.planes:
        if plane.name != "/host:CPU":
            continue
        for line in plane.lines:
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                start = line.timestamp_ns * 1000 + event.offset_ps
                if line.name == "python" and name == "_step":  # Trainer._step, the traced function
                    steps.append((start, start + event.duration_ps))
                elif line.name.startswith("tf_") and ":" in name and not name.startswith("ExecutorState"):
                    intervals.append((category(name.rsplit(":", 1)[1]), start, start + event.duration_ps))
    return steps, intervals


def split(steps, intervals):
    """Mean milliseconds per step of each category."""
    totals = np.zeros(len(CATEGORIES))
    for start, end in steps:
        bins = (end - start) // BIN_PS + 1
        owner = np.full(bins, len(CATEGORIES) - 1)
        for kind in reversed(range(len(CATEGORIES) - 1)):  # lower index wins, so it is painted last
            for kind_of, first, last in intervals:
                if kind_of != kind or last < start or first > start + bins * BIN_PS:
                    continue
                owner[max(0, (first - start) // BIN_PS):max(0, (last - start) // BIN_PS) + 1] = kind
        totals += np.bincount(owner, minlength=len(CATEGORIES)) * BIN_PS / 1e9
    return (totals / len(steps)).tolist()


def measure(args):
    """In this process: warm up, trace args.steps steps, print the split as one JSON line."""
    import tensorflow as tf

    from lm1b_hvd import bench, hparams
    from lm1b_hvd.model.language_model import LSTMPLanguageModel
    from lm1b_hvd.run.state import TrainingState
    from lm1b_hvd.update.step import Trainer

    hps = hparams.build(args.preset, args.hpconfig)
    vocab_size = args.vocab or bench.VOCAB_SIZES[args.preset]
    trainer = Trainer(TrainingState(LSTMPLanguageModel(hps, vocab_size)))
    batches = bench.zipf_batches(hps, vocab_size, count=4, seed=[hps.seed, 0])
    row_state = trainer.model.zero_state(hps.batch_size)
    for index in range(3):
        row_state, _ = trainer.step(*batches[index % len(batches)], row_state)
    trace_dir = tempfile.mkdtemp(prefix="lm1b-profile-")
    tf.profiler.experimental.start(trace_dir)
    for index in range(args.steps):
        row_state, _ = trainer.step(*batches[index % len(batches)], row_state)
    tf.profiler.experimental.stop()
    (xplane,) = glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "*.xplane.pb"))
    steps, intervals = read_trace(xplane)
    milliseconds = split(steps, intervals)
    print(json.dumps({"variant": args.hpconfig or "(preset)", "plan": trainer.model.plan.describe(),
                      "steps": len(steps), "ms": milliseconds}))


def draw(results, title, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = ("tab:blue", "tab:orange", "tab:green", "tab:gray", "white")
    figure, axes = plt.subplots(figsize=(8, 1.2 + 0.7 * len(results)), dpi=120)
    for row, result in enumerate(results):
        left = 0.0
        for kind, (ms, color) in enumerate(zip(result["ms"], colors)):
            axes.barh(row, ms, left=left, color=color, edgecolor="black", linewidth=0.5,
                      label=CATEGORIES[kind] if row == 0 else None)
            if ms > 0.06 * sum(result["ms"]):
                axes.text(left + ms / 2, row, f"{ms:.0f}", ha="center", va="center", fontsize=8)
            left += ms
    axes.set_yticks(range(len(results)), [result["variant"] for result in results])
    axes.invert_yaxis()
    axes.set_xlabel("ms per step (what runs at each instant; first of the legend wins)")
    axes.set_title(title)
    axes.legend(ncol=3, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.35 - 0.05 * len(results)))
    figure.tight_layout()
    figure.savefig(out, bbox_inches="tight")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="default")
    parser.add_argument("--vocab", type=int, default=0, help="default: the bench's for the preset")
    parser.add_argument("--variants", nargs="+", default=["kernels=cpu", "kernels=portable"],
                        help="--hpconfig strings, each measured in its own process")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", default="", help="PNG to draw the split into")
    parser.add_argument("--hpconfig", default=None, help=argparse.SUPPRESS)  # set for the measuring child
    args = parser.parse_args()
    if args.hpconfig is not None:
        return measure(args)
    results = []
    for variant in args.variants:
        child = subprocess.run([sys.executable, __file__, "--preset", args.preset, "--vocab", str(args.vocab),
                                "--steps", str(args.steps), "--hpconfig", variant],
                               capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
        if child.returncode != 0:
            sys.exit(f"{variant}: failed\n{child.stderr[-3000:]}")
        results.append(json.loads(child.stdout.strip().splitlines()[-1]))
        result = results[-1]
        print(f"{result['variant']}: {sum(result['ms']):,.1f} ms a step ({result['steps']} traced) | "
              + " | ".join(f"{name} {ms:,.1f} ms" for name, ms in zip(CATEGORIES, result["ms"])))
        print(f"  {result['plan']}")
    if args.out:
        draw(results, f"{args.preset} preset, one process, the step's wall time", args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
