"""Words/s against the number of ranks, with and without the gradient exchange, from bench runs.

Runs `horovodrun -np N python -m lm1b_hvd.bench` (and the same with --no_exchange) for each N,
alternating, reads the words/s and exchange lines the bench prints, prints a table and, with
--out, draws it (docs/performance.md's scaling picture). On one machine the ranks share its
cores: the picture then shows what the exchange costs, not how a cluster scales.

  .venv/bin/pip install matplotlib
  .venv/bin/python scripts/plot_scaling.py --preset demo --ranks 1 2 4 --steps 200 --out docs/demo_scaling.png
"""
import argparse
import os
import re
import statistics
import subprocess
import sys

BIN = os.path.dirname(sys.executable)


def bench(preset, ranks, steps, exchange, hpconfig):
    command = [os.path.join(BIN, "horovodrun"), "-np", str(ranks), "--gloo", sys.executable, "-m", "lm1b_hvd.bench",
               "--preset", preset, "--steps", str(steps)] + (["--hpconfig", hpconfig] if hpconfig else [])
    if not exchange:
        command.append("--no_exchange")
    out = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    if out.returncode != 0:
        sys.exit(f"{' '.join(command)}: failed\n{out.stderr[-3000:]}")
    words = float(re.search(r"words/s: ([\d,]+) over", out.stdout).group(1).replace(",", ""))
    handed = re.search(r"exchange: ([\d,.]+) MB", out.stdout)
    return words, float(handed.group(1).replace(",", "")) if handed else 0.0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--hpconfig", default="")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each kind (the median is drawn)")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    rows = []
    for ranks in args.ranks:
        runs = {True: [], False: []}
        for _ in range(args.repeats):
            for exchange in ((True, False) if ranks > 1 else (True,)):
                runs[exchange].append(bench(args.preset, ranks, args.steps, exchange, args.hpconfig))
        with_exchange = statistics.median(words for words, _ in runs[True])
        without = statistics.median(words for words, _ in runs[False]) if runs[False] else with_exchange
        handed = statistics.median(mb for _, mb in runs[True])
        rows.append((ranks, with_exchange, without, handed))
        print(f"{ranks} rank(s): {with_exchange:,.0f} words/s with the exchange ({handed:,.1f} MB handed to Horovod "
              f"per rank per step), {without:,.0f} without; runs: "
              + ", ".join(f"{w:,.0f}" for w, _ in runs[True]) + " / " + ", ".join(f"{w:,.0f}" for w, _ in runs[False]))
    if args.out:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        figure, axes = plt.subplots(figsize=(6, 3.6), dpi=120)
        axes.plot([r[0] for r in rows], [r[1] for r in rows], "o-", label="exchange on")
        axes.plot([r[0] for r in rows], [r[2] for r in rows], "s--", label="--no_exchange")
        axes.set_xticks([r[0] for r in rows])
        axes.set_xlabel(f"ranks (on {os.cpu_count()} cores of one machine)")
        axes.set_ylabel("words/s, all ranks")
        axes.set_ylim(0, max(max(r[1], r[2]) for r in rows) * 1.15)
        axes.set_title(f"{args.preset} preset, lm1b_hvd.bench, median of {args.repeats}")
        axes.grid(True, alpha=0.3)
        axes.legend()
        figure.tight_layout()
        figure.savefig(args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
