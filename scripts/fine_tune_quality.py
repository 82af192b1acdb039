"""Fine-tuned against from scratch on a new domain, at equal steps: heldout perplexity curves.

Trains a source model on --source_datadir (the general corpus), then two runs on
--target_datadir (the new domain, e.g. made by `prepare_data text`) for the same steps and
preset: one from scratch, one with `--init_from` the source's best checkpoint. Writes their
heldout curves on the target's heldout (JSON), a markdown table and a picture: what
docs/performance.md shows under "Fine-tuning on a new domain". A run already finished is not
run again.

  .venv/bin/pip install matplotlib
  .venv/bin/python -m lm1b_hvd.prepare_data text --input kjv.txt --outdir runs/kjv --heldout 1000
  .venv/bin/python scripts/fine_tune_quality.py --source_datadir SAMPLE --source_steps 6000 \\
      --target_datadir runs/kjv --steps 3000 --eval_every 250 --out runs/fine-tune-kjv
  .venv/bin/python scripts/fine_tune_quality.py --source_datadir SAMPLE --source_steps 6000 \\
      --source_logdir runs/fine-tune-kjv/source --target_datadir runs/kjv-small --steps 1500 \\
      --eval_every 100 --out runs/fine-tune-kjv-small
"""
import argparse
import os
import subprocess
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 (after the backend is chosen)

from lm1b_hvd import hparams  # noqa: E402
from run_curves import heldout_curve, save_comparison  # noqa: E402

RUNS = {"scratch": "from scratch", "fine-tuned": "fine-tuned from the source"}


def train(args, datadir, logdir, steps, extra=()):
    """One training run to `steps`, skipped when its checkpoint of that step is there (else it resumes)."""
    if os.path.exists(os.path.join(logdir, f"ckpt-{steps}.index")):
        return
    command = [os.path.join(os.path.dirname(sys.executable), "horovodrun"), "-np", str(args.ranks), "--gloo",
               sys.executable, "-m", "lm1b_hvd.train", "--datadir", datadir, "--logdir", logdir,
               "--preset", args.preset, "--max_steps", str(steps), "--eval_every", str(args.eval_every),
               "--log_every", "1000", "--checkpoint_secs", "0", *extra]
    print(" ".join(command), flush=True)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)


def table(curves, words_per_step):
    """Heldout perplexity of each run at its first, quarter, half, three-quarter and last
    evaluation, and its best."""
    steps = sorted(set.intersection(*(set(curve) for curve in curves.values())))
    shown = sorted({steps[len(steps) * quarter // 4] for quarter in range(4)} | {steps[-1]})
    lines = ["| run | " + " | ".join(f"step {step:,} ({step * words_per_step / 1e6:.2f}M words)" for step in shown)
             + " | best (step) |", "| --- |" + " --- |" * (len(shown) + 1)]
    for name, curve in curves.items():
        best = min(curve, key=curve.get)
        lines.append(f"| {RUNS[name]} | " + " | ".join(f"{curve[step]:.1f}" for step in shown)
                     + f" | {curve[best]:.1f} ({best:,}) |")
    return "\n".join(lines)


def plot(curves, words_per_step, title, path):
    figure, axes = plt.subplots(figsize=(7, 5), dpi=120)
    for name, curve in curves.items():
        steps = sorted(curve)
        axes.plot([step * words_per_step / 1e6 for step in steps], [curve[step] for step in steps], "o-",
                  markersize=3, label=RUNS[name])
    axes.set_yscale("log")  # the first evaluations differ by several times
    axes.set_xlabel("training words on the new domain (millions)")
    axes.set_ylabel("heldout perplexity on the new domain")
    axes.set_title(title)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source_datadir", required=True, help="the general corpus the source model learns")
    parser.add_argument("--source_logdir", default="",
                        help="the source run, trained here to --source_steps unless it got there; default: OUT/source")
    parser.add_argument("--target_datadir", required=True, help="the new domain's corpus")
    parser.add_argument("--out", required=True, help="folder for the runs, curves.json, table.md and curves.png")
    parser.add_argument("--preset", default="corpus")
    parser.add_argument("--source_steps", type=int, default=6000)
    parser.add_argument("--steps", type=int, default=3000, help="steps of each run on the new domain")
    parser.add_argument("--eval_every", type=int, default=250)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--title", default="", help="the picture's title; default: the preset and ranks")
    args = parser.parse_args()
    hps = hparams.build(args.preset, "")
    words_per_step = args.ranks * hps.batch_size * hps.num_steps
    source = args.source_logdir or os.path.join(args.out, "source")
    train(args, args.source_datadir, source, args.source_steps)
    curves = {}
    for name in RUNS:
        logdir = os.path.join(args.out, name)
        extra = ["--init_from", os.path.join(source, "best")] if name == "fine-tuned" else []
        train(args, args.target_datadir, logdir, args.steps, extra)
        curves[name] = heldout_curve(logdir)
    save_comparison(args.out, curves, table(curves, words_per_step))
    plot(curves, words_per_step, args.title or f"{args.preset} preset on a new domain, {args.ranks} ranks",
         os.path.join(args.out, "curves.png"))


if __name__ == "__main__":
    main()
