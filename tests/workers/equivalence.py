"""Run under `horovodrun -np N`: a few training steps on fixed data, weights saved per rank.

Shared with tests/test_multiprocess.py, which replays the same steps as the
original's N-tower update in one process and compares.
"""
import sys

import numpy as np
import tensorflow as tf

from lm1b_hvd.exchange import collectives
from lm1b_hvd.model.language_model import LSTMPLanguageModel
from lm1b_hvd.run.state import TrainingState
from lm1b_hvd.update.step import Trainer
from tests.model_helpers import batches_with_a_short_row, tiny_hparams

VOCAB = 31
STEPS = 4
HPS = tiny_hparams(max_grad_norm=0.05, learning_rate=0.2, ema_decay=0.9)


def fixed_sampler(tower):
    """Candidates fixed per tower (rank), so the one-process reference can use the same ones."""
    rng = np.random.default_rng(1000 + tower)
    candidates = tf.constant(rng.choice(VOCAB, HPS.num_sampled, replace=False), tf.int64)
    sampled_expected = tf.constant(rng.uniform(0.1, 0.9, HPS.num_sampled), tf.float32)

    def sampler(labels):
        return candidates, tf.fill(tf.shape(labels), 0.5), sampled_expected
    return sampler


def tower_batches(tower):
    def uniform(rng, shape):
        return tuple(rng.integers(0, VOCAB, shape).astype(np.int32) for _ in range(2))
    return batches_with_a_short_row(HPS, STEPS, 2000 + tower, uniform)


def main(outdir):
    ranks = collectives.init()
    rank = ranks.rank
    state = TrainingState(LSTMPLanguageModel(HPS, VOCAB, candidate_sampler=fixed_sampler(rank)))
    trainer = Trainer(state, ranks)
    row_state = state.model.zero_state(HPS.batch_size)
    for step, (x, y, w) in enumerate(tower_batches(rank)):
        row_state, stats = trainer.step(x, y, w, row_state)
        if step == 0:
            state.broadcast_from_root(ranks)
    np.savez(f"{outdir}/rank{rank}.npz",
             *[v.numpy() for v in state.model.all_variables + state.ema.shadows],
             step=int(state.step))


if __name__ == "__main__":
    main(sys.argv[1])
