"""One outer period as the bench timed it on rank 0 (`python -m lm1b_hvd.bench ... --steps_timeline
T.json`): the steps and the outer steps on the training thread, and an overlapped exchange on
its own thread from its send to its arrival, as bars against time.

  .venv/bin/pip install matplotlib
  .venv/bin/python scripts/plot_timeline.py T.json --out docs/overlap_timeline.png --period 2
"""
import argparse
import json


def window(record, period):
    """The [start, end) seconds of outer period number `period` (from 0): from the end of the
    outer step before it (or the first step) to the end of its own outer step."""
    outer = record["outer_steps"]
    start = outer[period - 1][1] if period > 0 else record["steps"][0][0]
    return start, outer[period][1]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("timeline", help="the bench's --steps_timeline file")
    parser.add_argument("--out", required=True, help="the picture (PNG)")
    parser.add_argument("--period", type=int, default=1, help="which outer period to draw, from 0")
    parser.add_argument("--title", default="one outer period on rank 0")
    args = parser.parse_args()
    with open(args.timeline) as handle:
        record = json.load(handle)
    start, end = window(record, args.period)
    margin = 0.05 * (end - start)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [("steps (training thread)", record["steps"], "tab:blue"),
            ("outer step (training thread)", record["outer_steps"], "tab:orange"),
            ("outer exchange (its own thread)", record.get("exchanges", []), "tab:green")]
    figure, axes = plt.subplots(figsize=(9, 2.6), dpi=120)
    for row, (_, spans, colour) in enumerate(rows):
        shown = [(max(s, start - margin), min(e, end + margin)) for s, e in spans
                 if e > start - margin and s < end + margin]
        axes.broken_barh([(s - start, e - s) for s, e in shown], (row - 0.35, 0.7), facecolors=colour,
                         edgecolor="white", linewidth=0.5)
    axes.set_yticks(range(len(rows)), [name for name, _, _ in rows])
    axes.invert_yaxis()
    axes.set_xlim(-margin, end - start + margin)
    axes.set_xlabel("seconds from the start of the period")
    axes.set_title(args.title)
    axes.grid(True, axis="x", alpha=0.3)
    figure.tight_layout()
    figure.savefig(args.out)


if __name__ == "__main__":
    main()
