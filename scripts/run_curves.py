"""Reading runs' curves from their TensorBoard event files, and saving a comparison of runs:
what the scripts that compare runs (two_level_quality.py, fine_tune_quality.py) and
plot_learning_curve.py share."""
import json
import os

import tensorflow as tf


def scalars(event_dir, tag):
    """{step: value} of one scalar tag in a folder of event files."""
    values = {}
    for name in sorted(os.listdir(event_dir)):
        for event in tf.compat.v1.train.summary_iterator(os.path.join(event_dir, name)):
            for value in event.summary.value:
                if value.tag == tag:
                    values[event.step] = float(tf.make_ndarray(value.tensor))
    return values


def heldout_curve(logdir):
    """{step: heldout perplexity} of a run (its --eval_every evaluations)."""
    return scalars(os.path.join(logdir, "eval"), "eval/perplexity")


def save_comparison(out, curves, table):
    """OUT/curves.json (the runs' curves) and OUT/table.md (their markdown table), which is printed."""
    with open(os.path.join(out, "curves.json"), "w") as handle:
        json.dump(curves, handle, indent=1)
    with open(os.path.join(out, "table.md"), "w") as handle:
        handle.write(table + "\n")
    print(table)
