"""Run under `horovodrun -np N`: variables that differ by rank, broadcast from rank 0, saved per rank.

One is read sparsely first (as the embedding shards are), which makes TensorFlow copy it
on write; one is an int64 scalar (as the optimizer's step count)."""
import sys

import numpy as np
import tensorflow as tf

from lm1b_hvd.exchange import collectives


def rank_values(rank):
    rng = np.random.default_rng(rank)
    return [rng.standard_normal([40, 6]).astype(np.float32), rng.standard_normal([7]).astype(np.float32),
            np.int64(100 + rank)]


def main(outdir):
    ranks = collectives.init()
    rank = ranks.rank
    variables = [tf.Variable(value, name=f"state_{i}") for i, value in enumerate(rank_values(rank))]
    variables[0].sparse_read([1, 3]).numpy()
    ranks.broadcast_from_root(variables)
    np.savez(f"{outdir}/rank{rank}.npz", *[v.numpy() for v in variables])


if __name__ == "__main__":
    main(sys.argv[1])
