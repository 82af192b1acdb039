"""Each regularisation option's effect at equal wall time: one training run per row, the same
preset, seeds, data, ranks and --max_time, each row one option added to the baseline (and the
`corpus` recipe, all of them together), then a markdown table of the best heldout perplexity,
its step, and the steps the run made in its time.

  .venv/bin/python scripts/compare_options.py --datadir SAMPLE --minutes 15 \\
      --workdir runs/options > docs/options_table.md

Each run is `horovodrun -np NP python -m lm1b_hvd.train --preset P --hpconfig ROW --max_time
... --eval_every 500`; a row whose run fails prints its exit status and the run's last lines.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time

# (row name, preset, hpconfig): one option at a time over the baseline, then the recipe.
ROWS = [
    ("baseline: `small`", "small", ""),
    ("`keep_prob=0.3`", "small", "keep_prob=0.3"),
    ("`tie_embeddings=true`", "small", "tie_embeddings=true"),
    ("`variational_dropout=true`", "small", "variational_dropout=true"),
    ("`emb_keep_prob=0.9`", "small", "emb_keep_prob=0.9"),
    ("`recurrent_keep_prob=0.5`", "small", "recurrent_keep_prob=0.5"),
    ("`lr_decay=0.5`", "small", "lr_decay=0.5"),
    ("`corpus` (the recipe)", "corpus", ""),
]


def train(args, name, preset, hpconfig):
    """Runs one row; returns (exit status, the run's log directory, its output)."""
    logdir = os.path.join(args.workdir, re.sub(r"\W+", "_", name).strip("_"))
    command = [os.path.join(os.path.dirname(sys.executable), "horovodrun"), "-np", str(args.np), sys.executable,
               "-m", "lm1b_hvd.train", "--datadir", args.datadir, "--logdir", logdir, "--preset", preset,
               "--max_time", str(args.minutes * 60), "--eval_every", str(args.eval_every)]
    if hpconfig:
        command += ["--hpconfig", hpconfig]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    return done.returncode, logdir, done.stdout + done.stderr


def last_step(output):
    steps = re.findall(r"stopped at step (\d+)", output)
    return int(steps[-1]) if steps else None


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datadir", required=True, help="a corpus in the lm1b layout")
    parser.add_argument("--workdir", required=True, help="a new directory for the runs' log directories")
    parser.add_argument("--minutes", type=float, default=15.0, help="each run's --max_time, in minutes")
    parser.add_argument("--eval_every", type=int, default=500)
    parser.add_argument("--np", type=int, default=2, help="ranks per run")
    parser.add_argument("--only", default="", help="comma-separated row numbers (1-based) to run; default: all")
    args = parser.parse_args()
    if os.path.exists(args.workdir) and os.listdir(args.workdir):
        parser.error(f"--workdir {args.workdir} is not empty: each row must start from scratch")
    chosen = [int(k) - 1 for k in args.only.split(",")] if args.only else range(len(ROWS))
    print(f"{args.np} ranks, {args.minutes:g} minutes each, --eval_every {args.eval_every}, data {args.datadir}\n")
    print("| run | `--hpconfig` over its preset | best heldout perplexity | at step | steps in the time |")
    print("| --- | --- | ---: | ---: | ---: |")
    began = time.monotonic()
    for done_rows, index in enumerate(chosen):
        name, preset, hpconfig = ROWS[index]
        status, logdir, output = train(args, name, preset, hpconfig)
        if status:
            print(f"| {name} | {hpconfig} | failed with exit status {status} | | |")
            print(output[-2000:], file=sys.stderr)
            continue
        with open(os.path.join(logdir, "best", "best.json")) as handle:
            best = json.load(handle)
        print(f"| {name} | {hpconfig or '(none)'} | {best['perplexity']:.1f} | {best['step']:,} | "
              f"{last_step(output) or 0:,} |", flush=True)
        left = (time.monotonic() - began) / (done_rows + 1) * (len(chosen) - done_rows - 1)
        print(f"{done_rows + 1}/{len(chosen)} runs done, about {left / 60:.0f} min left", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
