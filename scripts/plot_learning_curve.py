"""A run's learning curve from its TensorBoard event files, against the demo corpus's oracle.

Training perplexity (L/train, every --summary_every steps) and heldout perplexity (L/eval,
every --eval_every steps and at the end) against the step, with the demo language's exact
perplexity as a line: what docs/performance.md shows for the README's main command.

  .venv/bin/pip install matplotlib
  horovodrun -np 2 .venv/bin/python -m lm1b_hvd.train --logdir runs/demo-curve --eval_every 500
  .venv/bin/python scripts/plot_learning_curve.py --logdir runs/demo-curve --out docs/demo_learning_curve.png
"""
import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 (after the backend is chosen)

from run_curves import heldout_curve, scalars  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--logdir", required=True)
    parser.add_argument("--datadir", default="", help="the corpus (for its oracle.json); default: the run's demo corpus")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--title", default="demo preset, 2 ranks on 2 CPU cores")
    args = parser.parse_args()
    if args.datadir:
        oracle_path = os.path.join(args.datadir, "oracle.json")
    else:
        from lm1b_hvd import demo_corpus
        oracle_path = os.path.join(demo_corpus.ensure_demo_corpus(), "oracle.json")
    oracle = json.load(open(oracle_path))["oracle_perplexity"] if os.path.exists(oracle_path) else None

    train = scalars(os.path.join(args.logdir, "train"), "perplexity")
    heldout = heldout_curve(args.logdir)
    figure, axes = plt.subplots(figsize=(7, 4), dpi=120)
    axes.plot(sorted(train), [train[s] for s in sorted(train)], color="tab:blue", alpha=0.6, linewidth=0.8,
              label="training batches (sampled softmax)")
    axes.plot(sorted(heldout), [heldout[s] for s in sorted(heldout)], "o-", color="tab:red",
              label="heldout (full softmax, EMA weights)")
    if oracle:
        axes.axhline(oracle, color="black", linestyle="--", linewidth=1, label=f"oracle {oracle:.2f}")
    last = max(heldout)
    axes.annotate(f"{heldout[last]:.2f}", (last, heldout[last]), textcoords="offset points", xytext=(-10, 8))
    axes.set_yscale("log")
    axes.set_xlabel("step")
    axes.set_ylabel("perplexity (log scale)")
    axes.set_title(args.title)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(args.out)
    print(f"wrote {args.out}: heldout perplexity {heldout[last]:.2f} at step {last}"
          + (f", oracle {oracle:.2f}" if oracle else ""))


if __name__ == "__main__":
    main()
