"""Run under `horovodrun -np 4`: two simulated nodes of two ranks train with an outer step every
H steps (update.outer), in each of MODES (replicated or vocabulary-parallel; the exchange in
fp32, fp16, 8 or 4 bits; Adagrad's accumulators averaged or kept per node); each rank saves
what it holds at the start and just before and just after each of the first three outer steps,
and what each outer step sent between the nodes.

Shared with tests/test_two_level.py, which checks each outer step against its formula.
Usage: python -m tests.workers.outer_step OUTDIR H OUTER_LR OUTER_MOMENTUM [plain|overlapped]
"""
import sys

import numpy as np

from lm1b_hvd.run import stack
from tests.workers.vocab_parallel import HPS, VOCAB, batches, held

RANKS_PER_NODE = 2
OUTER_STEPS = 3


# Each mode's hparams beside outer_every, outer_lr and outer_momentum; fp32 between nodes unless it says.
MODES = {
    "replicated": {},
    "vocab_parallel": dict(vocab_parallel=True),
    "vocab_parallel_fp16": dict(vocab_parallel=True, outer_fp16=True),
    "replicated_local": dict(outer_slots="local"),
    "replicated_local_8": dict(outer_slots="local", outer_bits=8),
    "vocab_parallel_4": dict(vocab_parallel=True, outer_bits=4),
}
# Under an MPI launch (their exchange on a communicator of its own, beside Horovod's).
OVERLAPPED = {
    "replicated_overlapped": dict(outer_slots="local", outer_overlap=True),
    "vocab_parallel_overlapped_8": dict(vocab_parallel=True, outer_slots="local", outer_overlap=True, outer_bits=8),
}


def main(outdir, every, outer_lr, outer_momentum, which="plain"):
    ranks = stack.start_ranks(HPS.replace(outer_every=every))
    for mode, setting in (OVERLAPPED if which == "overlapped" else MODES).items():
        hps = HPS.replace(**{"outer_fp16": False, **setting}, outer_every=every, outer_lr=outer_lr,
                          outer_momentum=outer_momentum, average_tables=True)
        saved = train(hps, ranks)
        np.savez(f"{outdir}/{mode}{ranks.rank}.npz",
                 **{f"{when}/{name}": value for when, values in saved.items() for name, value in values.items()})
    ranks.sum(np.zeros(1, np.float32))  # no rank leaves (shutting Horovod down) while another still exchanges


def train(hps, ranks):
    """{when: what this rank holds then}: at the start, and before and after each outer step;
    under "exchange", each outer step's update.outer.OuterExchange. The training stack as a run
    builds it, and its sync mode (run.modes.TwoLevel) after each step."""
    every = hps.outer_every
    built = stack.build(hps, VOCAB, ranks, stack.Launch(ranks_per_node=RANKS_PER_NODE))
    state, mode = built.state, built.mode
    mode.start()
    mode.start_timing()  # the mode keeps what each outer step sent
    saved = {"start": held(state)}
    row_state = state.model.zero_state(hps.batch_size)
    for step, (x, y, w) in enumerate(batches(ranks.rank, OUTER_STEPS * every), start=1):
        row_state, _ = built.trainer.step(x, y, w, row_state)
        if step % every == 0:
            saved[f"before{step // every}"] = held(state)
        settled = mode.after_step(step, first=step == 1)
        assert settled == (step % every == 0), (step, settled)
        if settled:
            saved[f"after{step // every}"] = held(state)
    exchanges = [timing.exchange for timing in mode.timings if timing.exchange is not None]
    saved["exchange"] = {field: np.array([getattr(exchange, field) for exchange in exchanges])
                         for field in exchanges[0]._fields}
    return saved


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), *sys.argv[5:])
