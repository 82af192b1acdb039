"""`python -m lm1b_hvd.evaluate --logdir L --datadir D --mode eval_test_ave|eval_train`

The original's separate evaluation job: one process that waits for each new
checkpoint in the log directory, evaluates it with the full softmax (the EMA
weights when the run averages them), and writes `eval/perplexity` and
`eval/log_perplexity` to L/<mode>/ for TensorBoard. `--once` evaluates the
latest checkpoint and exits.

Examples:
  python -m lm1b_hvd.evaluate --logdir runs/demo --once
  python -m lm1b_hvd.evaluate --logdir L --datadir /data/lm1b --mode eval_test_ave --timeout 7200
"""
import math
import os
import sys

import tensorflow as tf

from lm1b_hvd import console, devices
from lm1b_hvd.data import dataset, demo_corpus
from lm1b_hvd.run import checkpoints, evaluation, weights as weights_lib

MODES = {"eval_test_ave": "heldout", "eval_train": "train"}


class CheckpointEvaluator:
    def __init__(self, logdir, datadir, mode, eval_steps):
        self.logdir, self.mode, self.eval_steps = logdir, mode, eval_steps
        weights = weights_lib.run_weights(logdir, datadir)
        self.hps, self.state = weights.hps, weights.state
        self.dataset = dataset.ShardedDataset.for_rank(datadir, MODES[mode], weights.vocab)
        self.evaluator = evaluation.Evaluator(self.state.model, self.state.ema, report=console.say)
        self.writer = evaluation.summary_writer(os.path.join(logdir, mode))

    def evaluate(self, path):
        """Perplexity of checkpoint `path`; writes its summaries at the checkpoint's step."""
        self.state.restore(path)
        step = checkpoints.step_of(path)
        sums = self.evaluator.sums(self.dataset.sentences_once(), self.eval_steps)
        value = evaluation.perplexity(*sums)
        evaluation.write_summaries(self.writer, step, value)
        console.say(f"{self.mode} step {step} | perplexity {value:.2f} | log perplexity {math.log(value):.4f} "
                    f"| {int(sums[1])} words | {path}")
        return step, value


def main(argv=None):
    parser = console.ArgumentParser(__doc__, "lm1b_hvd.evaluate")
    parser.add_argument("--logdir", required=True, help="the training run's log directory")
    parser.add_argument("--datadir", default="", help="default: the demo corpus")
    parser.add_argument("--mode", default="eval_test_ave", choices=sorted(MODES),
                        help="eval_test_ave: the heldout files; eval_train: the training files")
    parser.add_argument("--eval_steps", type=int, default=0, help="batches per checkpoint; 0: all")
    parser.add_argument("--once", action="store_true", help="evaluate the latest checkpoint and exit")
    parser.add_argument("--timeout", type=float, default=None,
                        help="stop after this many seconds without a new checkpoint")
    parser.add_argument("--allow_cpu", action="store_true", help="run on the CPU even if the job was given GPUs")
    args = parser.parse_args(argv)
    return console.run_main(lambda: evaluate(args))


def evaluate(args):
    devices.check_gpus_used(args.allow_cpu)
    evaluator = CheckpointEvaluator(args.logdir, args.datadir or demo_corpus.ensure_demo_corpus(),
                                    args.mode, args.eval_steps)
    if args.once:
        evaluator.evaluate(checkpoints.find_checkpoint(args.logdir))
        return
    for path in tf.train.checkpoints_iterator(args.logdir, timeout=args.timeout):
        try:
            evaluator.evaluate(path)
        except tf.errors.NotFoundError:
            console.say(f"skipped {path}: removed before it could be read")


if __name__ == "__main__":
    sys.exit(main())
