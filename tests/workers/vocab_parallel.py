"""Run under `horovodrun -np N`: the same steps replicated, then with the vocabulary sharded over
the ranks (vocab_parallel), from the same seeds on the same data; each rank saves what it holds.

Shared with tests/test_vocab_parallel.py, which checks that every variable agrees.
Usage: python -m tests.workers.vocab_parallel OUTDIR GRAD_COMBINE STEPS [HPCONFIG]
"""
import sys

import numpy as np

from lm1b_hvd import hparams
from lm1b_hvd.run import stack
from tests.model_helpers import batches_with_a_short_row, tiny_hparams, whole

VOCAB = 53  # divides evenly by neither 2 nor 4 ranks, nor by num_shards
HPS = tiny_hparams(num_layers=2, num_sampled=10, keep_prob=0.8, max_grad_norm=1.0, ema_decay=0.9)


def batches(rank, steps):
    def zipf(rng, shape):
        # Zipf-like ids, so that ranks share rows and ask for rows of every owner
        ids = np.minimum(np.floor(np.exp(rng.uniform(0, np.log(VOCAB + 1), (shape[0], shape[1] + 1)))) - 1, VOCAB - 1)
        return ids[:, :-1].astype(np.int32), ids[:, 1:].astype(np.int32)
    return batches_with_a_short_row(HPS, steps, 3000 + rank, zipf)


def train(hps, steps, ranks):
    built = stack.build(hps, VOCAB, ranks)
    row_state = built.model.zero_state(hps.batch_size)
    for step, (x, y, w) in enumerate(batches(ranks.rank, steps), start=1):
        row_state, _ = built.trainer.step(x, y, w, row_state)
        built.mode.after_step(step, first=step == 1)
    return built.state


def held(state):
    """{name: value} of everything this rank holds: the LSTM, its slots and EMA, and the
    tables' rows with their accumulators (and averages, with average_tables)."""
    model = state.model
    values = {f"lstm_{i}": v.numpy() for i, v in enumerate(model.lstm_variables)}
    values.update({f"lstm_slot_{i}": v.numpy() for i, v in enumerate(state.optimizer.accumulators())})
    values.update({f"ema_{i}": v.numpy() for i, v in enumerate(state.ema.shadows)})
    for table, accumulators in zip(model.tables, state.table_accumulators):
        for prefix, source in ((table.name, table), (f"{table.name}_slot", accumulators)):
            values[prefix] = whole(source)
        values[f"{table.name}_rows"] = np.array([table.rows.first, table.rows.stop])
    for table, average in zip(model.tables, state.ema.table_shadows):
        values[f"{table.name}_average"] = whole(average)
    return values


def main(outdir, grad_combine, steps, overrides=""):
    ranks = stack.start_ranks(HPS)
    hps = hparams.parse_overrides(HPS.replace(grad_combine=grad_combine), overrides)
    replicated = held(train(hps, steps, ranks))
    sharded = held(train(hps.replace(vocab_parallel=True), steps, ranks))
    rank = ranks.rank
    np.savez(f"{outdir}/replicated{rank}.npz", **replicated)
    np.savez(f"{outdir}/sharded{rank}.npz", **sharded)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), *sys.argv[4:])
