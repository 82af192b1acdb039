"""Two levels against synchronous at equal steps: heldout perplexity against training words.

Trains one run per outer setting on the same ranks grouped into simulated nodes, each for the
same steps with a heldout evaluation every --eval_every steps, then writes the curves (JSON), a
markdown table (best and final heldout perplexity, and the best against the synchronous run's)
and a picture: what docs/performance.md shows under "Across nodes". A setting is
H[/OUTER_LR/OUTER_MOMENTUM][+LEVER...] (H 0: synchronous), a lever one of fp16 or fp32 (hparam
outer_fp16), 8 or 4 (outer_bits), local (outer_slots=local), overlap (outer_overlap).

  .venv/bin/pip install matplotlib
  .venv/bin/python scripts/two_level_quality.py --preset demo --steps 4096 --eval_every 256 \\
      --runs 0,16+fp32,64+fp32,256+fp32,64/1/0+fp32,64+fp16,256+fp16,1024+fp16 --out runs/two-level-demo
  .venv/bin/python scripts/two_level_quality.py --preset demo --steps 8192 --eval_every 512 \\
      --runs 0,64,64+local,64+local+8,64+local+4,256,256+local+4 --out runs/two-level-levers
"""
import argparse
import os
import subprocess
import sys

from lm1b_hvd import hparams
from run_curves import heldout_curve, save_comparison


LEVERS = {"fp16": ("outer_fp16", "true", "fp16 between nodes"), "fp32": ("outer_fp16", "false", "fp32 between nodes"),
          "8": ("outer_bits", "8", "8 bits"), "4": ("outer_bits", "4", "4 bits"),
          "local": ("outer_slots", "local", "accumulators kept per node"),
          "overlap": ("outer_overlap", "true", "overlapped")}


def parse(setting):
    """(H, [OUTER_LR, OUTER_MOMENTUM], [LEVER, ...]) of 'H[/OUTER_LR/OUTER_MOMENTUM][+LEVER...]'."""
    outer, *levers = setting.split("+")
    period, *rates = outer.split("/")
    unknown = [lever for lever in levers if lever not in LEVERS]
    if unknown:
        raise SystemExit(f"--runs {setting}: unknown lever(s) {', '.join(unknown)} (known: {', '.join(LEVERS)})")
    return period, rates, levers


def outer_hpconfig(setting):
    """The hparams of a run setting; H 0 is synchronous."""
    period, rates, levers = parse(setting)
    if period == "0":
        return ""
    names = ("outer_every", "outer_lr", "outer_momentum")
    return ",".join([f"{name}={value}" for name, value in zip(names, [period, *rates])]
                    + [f"{LEVERS[lever][0]}={LEVERS[lever][1]}" for lever in levers])


def label(setting):
    period, rates, levers = parse(setting)
    if period == "0":
        return "synchronous"
    return ", ".join([f"H = {period}"] + ([f"outer_lr {rates[0]}, momentum {rates[1]}"] if rates else [])
                     + [LEVERS[lever][2] for lever in levers])


def train(args, setting, logdir):
    hpconfig = ",".join(part for part in (args.hpconfig, outer_hpconfig(setting)) if part)
    controller = "--mpi" if "overlap" in parse(setting)[2] else "--gloo"  # an overlapped exchange needs MPI
    command = [os.path.join(os.path.dirname(sys.executable), "horovodrun"), "-np", str(args.ranks), controller,
               sys.executable, "-m", "lm1b_hvd.train", "--logdir", logdir, "--preset", args.preset,
               "--max_steps", str(args.steps), "--eval_every", str(args.eval_every), "--log_every", "1000",
               "--ranks_per_node", str(args.ranks_per_node), "--checkpoint_secs", "0"]
    command += ["--datadir", args.datadir] if args.datadir else []
    command += ["--hpconfig", hpconfig] if hpconfig else []
    print(" ".join(command), flush=True)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)


def table(curves, words_per_step):
    synchronous = min(curves["0"].values())
    lines = ["| run | best heldout perplexity (step) | final | best against synchronous |",
             "| --- | --- | --- | --- |"]
    for setting, curve in curves.items():
        best_step = min(curve, key=curve.get)
        words = best_step * words_per_step / 1e6
        lines.append(f"| {label(setting)} | {curve[best_step]:.2f} ({best_step:,}; {words:.1f}M "
                     f"words) | {curve[max(curve)]:.2f} | {100 * (curve[best_step] / synchronous - 1):+.2f}% |")
    return "\n".join(lines)


def plot(curves, words_per_step, title, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(figsize=(7, 5), dpi=120)
    for setting, curve in curves.items():
        steps = sorted(curve)
        axes.plot([step * words_per_step / 1e6 for step in steps], [curve[step] for step in steps], "o-",
                  markersize=3, label=label(setting))
    best = min(min(curve.values()) for curve in curves.values())
    last = max(curve[max(curve)] for curve in curves.values())
    axes.set_ylim(best * 0.99, max(best * 1.25, last * 1.1))  # the curves' ends, where the runs differ
    axes.set_xlabel("training words (millions)")
    axes.set_ylabel("heldout perplexity")
    axes.set_title(title)
    axes.grid(True, which="both", alpha=0.3)
    long_labels = max(len(label(setting)) for setting in curves) > 45  # one column, or they are cut off
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=1 if long_labels else 2,
                fontsize="small")  # below the curves
    figure.savefig(path, bbox_inches="tight")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for the runs, curves.json, table.md and curves.png")
    parser.add_argument("--datadir", default="", help="the corpus; empty: the demo corpus")
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--hpconfig", default="", help="overrides for every run")
    parser.add_argument("--steps", type=int, default=4096)
    parser.add_argument("--eval_every", type=int, default=256)
    parser.add_argument("--runs", default="0,16,64,256",
                        help="outer settings, H[/OUTER_LR/OUTER_MOMENTUM][+LEVER...] (default rates: the hparams'; "
                             "levers: " + ", ".join(LEVERS) + "); 0: synchronous")
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--ranks_per_node", type=int, default=2)
    args = parser.parse_args()
    hps = hparams.build(args.preset, args.hpconfig)
    words_per_step = args.ranks * hps.batch_size * hps.num_steps
    curves = {}
    for setting in args.runs.split(","):
        logdir = os.path.join(args.out, "H" + setting.replace("/", "-").replace("+", "-"))
        parse(setting)
        if not os.path.exists(os.path.join(logdir, f"ckpt-{args.steps}.index")):  # not run to its end yet
            train(args, setting, logdir)
        curves[setting] = heldout_curve(logdir)
    save_comparison(args.out, curves, table(curves, words_per_step))
    plot(curves, words_per_step, f"{args.preset} preset, {args.ranks // args.ranks_per_node} nodes x "
         f"{args.ranks_per_node} ranks", os.path.join(args.out, "curves.png"))


if __name__ == "__main__":
    main()
