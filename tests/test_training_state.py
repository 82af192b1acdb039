"""run.state.TrainingState is the one list of what a run persists: every variable a training step
writes is in one of its pieces, its checkpoint holds every piece it saves, rank 0's broadcast and
the elastic commit take the pieces every rank shares."""
import dataclasses
import json

import numpy as np
import pytest
import tensorflow as tf

from lm1b_hvd.exchange import collectives
from lm1b_hvd.exchange.vocab_parallel import VocabExchange
from lm1b_hvd.model.language_model import LSTMPLanguageModel
from lm1b_hvd.model.pieces import Travel
from lm1b_hvd.run.position import RunPoint
from lm1b_hvd.run.state import TrainingState
from lm1b_hvd.update.outer import OuterStep
from lm1b_hvd.update.outer_parts import OuterMomentum, owned_parts
from lm1b_hvd.update.step import Trainer
from tests.model_helpers import tiny_hparams

VOCAB = 29
# Tied embeddings need emb_size == projected_size.
SHAPE = dict(num_shards=2, emb_size=6, state_size=8, projected_size=6, num_sampled=7, keep_prob=0.8)
BATCH = tiny_hparams().batch_size, tiny_hparams().num_steps
CASES = {
    "demo-like": dict(tie_embeddings=True, average_tables=True),
    "untied, two layers, F-LSTM": dict(num_layers=2, lstm_factor=3, average_tables=True),
    "fp16": dict(precision="fp16"),
    "vocab_parallel": dict(vocab_parallel=True, average_tables=True),
}


def batch(seed):
    rng = np.random.default_rng(seed)
    x, y = (rng.integers(0, VOCAB, BATCH).astype(np.int32) for _ in range(2))
    return x, y, np.ones(x.shape, np.float32)


def state_of(case):
    hps = tiny_hparams(**SHAPE, **CASES[case])
    ranks = collectives.init()  # one rank: vocab_parallel's exchange runs its collectives on itself
    exchange = VocabExchange(VOCAB, ranks) if hps.vocab_parallel else None
    return TrainingState(LSTMPLanguageModel(hps, VOCAB, vocab_exchange=exchange)), ranks


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_variable_a_step_writes_is_in_the_state(case):
    state, ranks = state_of(case)
    trainer = Trainer(state, ranks)
    row_state = state.model.zero_state(BATCH[0])
    row_state, _ = trainer.step(*batch(0), row_state)  # traces the step
    args = [tf.convert_to_tensor(t) for t in batch(1)]
    traced = trainer.traced_step((*args, row_state, tf.zeros([3])))
    captured = [v for v in traced.variables]
    before = [v.numpy().copy() for v in captured]
    trainer.step(*batch(1), row_state)
    written = [v for v, value in zip(captured, before) if not np.array_equal(v.numpy(), value)]
    assert len(written) > 10, "the step wrote the weights, slots, averages and step count"
    held = {v.ref() for v in state.variables()}
    missing = [v.name for v in written if v.ref() not in held]
    assert not missing, f"written by a step but in no piece of the state: {missing}"


def test_the_checkpoint_holds_every_saved_piece_and_restores_each(tmp_path):
    state, ranks = state_of("demo-like")
    trainer = Trainer(state, ranks)
    row_state = state.model.zero_state(BATCH[0])
    for step in range(3):
        row_state, _ = trainer.step(*batch(step), row_state)
    state.record_every_rank(RunPoint.start(3, state.model), ranks)
    path = state.write(str(tmp_path / "ckpt-3"))
    keys = [name for name, _ in tf.train.list_variables(path)]
    records = json.loads(tf.train.load_checkpoint(path).get_tensor(
        "run_position/streams/.ATTRIBUTES/VARIABLE_VALUE").decode())
    for piece in state.pieces:
        if piece.kind == "json":  # a record beside the run position
            assert piece.key.split("/")[-1] in records, piece.key
            continue
        saved_in = "optimizer" if piece.kind == "inside optimizer" else piece.key
        assert any(key == saved_in or key.startswith(saved_in + "/") for key in keys), piece.key
    fresh, _ = state_of("demo-like")
    fresh.restore(path)
    for mine, theirs in zip(fresh.variables(), state.variables()):
        np.testing.assert_array_equal(mine.numpy(), theirs.numpy(), err_msg=mine.name)
    assert [line.split(":")[0] for line in state.describe()] == [piece.key for piece in state.pieces]


def test_the_shared_pieces_are_what_rank_0_broadcasts():
    """Replicated every piece but the run position is broadcast; vocabulary-parallel the tables,
    their accumulators and averages stay with their rows' owner."""
    replicated, _ = state_of("demo-like")
    shared = {v.ref() for v in replicated.shared_variables()}
    everything = {v.ref() for v in replicated.variables()}
    assert shared == everything
    sharded, _ = state_of("vocab_parallel")
    shared = {v.ref() for v in sharded.shared_variables()}
    tables = [piece for piece in sharded.pieces if piece.kind == "table"]
    assert len(tables) == 9 and not any(v.ref() in shared for piece in tables for v in piece.variables)
    assert {v.ref() for v in sharded.model.lstm_variables + sharded.ema.shadows} <= shared
    assert sharded.step.ref() in shared and sharded.optimizer.learning_rate.ref() in shared


def test_a_checkpoint_resumes_under_another_precision(tmp_path):
    """precision says how a step computes, not what it persists; Keras saves fp16's loss scale
    with the optimizer, and restores it when the scale is made, at the first step."""
    def trained(precision, steps, restore_from=None):
        state = TrainingState(LSTMPLanguageModel(tiny_hparams(**SHAPE, precision=precision), VOCAB))
        if restore_from:
            state.restore(restore_from)
        trainer = Trainer(state)
        row_state = state.model.zero_state(BATCH[0])
        for step in range(steps):
            row_state, _ = trainer.step(*batch(step), row_state)
        return state

    fp32 = trained("fp32", 2).write(str(tmp_path / "fp32-2"))
    fp16 = trained("fp16", 3, restore_from=fp32)
    (good_steps,) = [v for v in fp16.variables() if v.name.startswith("good_steps")]
    assert int(fp16.step) == 5 and int(good_steps) == 3, "the scale started afresh"
    fp16_path = fp16.write(str(tmp_path / "fp16-5"))
    assert any(key.startswith("optimizer/loss_scale/") for key, _ in tf.train.list_variables(fp16_path))
    again = trained("fp16", 1, restore_from=fp16_path)
    (good_steps,) = [v for v in again.variables() if v.name.startswith("good_steps")]
    assert int(again.step) == 6 and int(good_steps) == 4, "the saved scale's count went on"
    assert int(trained("fp32", 1, restore_from=fp16_path).step) == 6


def outer_stepping(travel):
    """A training state whose slots (Adagrad's accumulators) travel as `travel`, its trainer, and
    its outer step over one node of this one process (the nodes' mean is the node's own)."""
    hps = tiny_hparams(**SHAPE, **CASES["demo-like"], outer_every=2, outer_lr=0.5, outer_momentum=0.5, ema_decay=0.9,
                       outer_fp16=False)
    ranks = collectives.init()
    state = TrainingState(LSTMPLanguageModel(hps, VOCAB))
    state.pieces = [dataclasses.replace(piece, travel=travel) if piece.travel is Travel.AVERAGED else piece
                    for piece in state.pieces]
    one = collectives.HorovodRanks()
    nodes = collectives.NodeGroups(node=one, across=one, count=1, index=0)
    outer = OuterStep(state, nodes, hps, OuterMomentum(owned_parts(state.of(Travel.STEPPED), nodes.node)))
    return state, Trainer(state, ranks, averages_each_step=False), outer


def test_an_outer_step_takes_each_piece_as_it_travels_and_a_stop_goes_back_to_it():
    """The outer step iterates the pieces: the weights stepped, the slots averaged (or kept,
    and then not sent), the averages moved, what is alike remembered; a stop between outer
    steps goes back to all of it."""
    sent = {}
    for travel in (Travel.AVERAGED, Travel.KEPT_PER_NODE):
        state, trainer, outer = outer_stepping(travel)
        outer.start()
        row_state = state.model.zero_state(BATCH[0])
        anchors = [v.numpy() for v in state.model.lstm_variables]
        averages = [v.numpy() for v in state.ema.shadows]
        for step in range(2):
            row_state, _ = trainer.step(*batch(step), row_state)
        slots = [v.numpy() for piece in state.of(travel) for v in piece.variables]
        trained = [v.numpy() for v in state.model.lstm_variables]
        sent[travel] = outer.step()
        for anchor, theta, now in zip(anchors, trained, state.model.lstm_variables):
            change = anchor - theta  # one node: the mean change is its own; the momentum starts at zero
            np.testing.assert_allclose(now.numpy(), anchor - 0.5 * (change + 0.5 * change), rtol=0, atol=1e-6)
        stepped = [v.numpy() for v in state.model.lstm_variables]
        for average, before, weight in zip(state.ema.shadows, averages, stepped):  # two steps of the decay
            np.testing.assert_allclose(average.numpy(), before - (1 - 0.9 ** 2) * (before - weight), atol=1e-6)
        for slot, before in zip([v for piece in state.of(travel) for v in piece.variables], slots):
            np.testing.assert_allclose(slot.numpy(), before, rtol=0, atol=1e-6)  # one node's own, either way

        row_state, _ = trainer.step(*batch(2), row_state)
        assert int(state.step) == 3
        outer.roll_back()
        assert int(state.step) == 2
        for now, then in zip(state.model.lstm_variables, stepped):
            np.testing.assert_array_equal(now.numpy(), then)
        for slot, then in zip([v for piece in state.of(travel) for v in piece.variables], slots):
            np.testing.assert_allclose(slot.numpy(), then, rtol=0, atol=1e-6)
    averaged, kept = sent[Travel.AVERAGED], sent[Travel.KEPT_PER_NODE]
    assert averaged.rows_changed == kept.rows_changed > 0
    # 4 bytes a value (fp32 here): the kept slots' increments are not sent, the same row flags are.
    assert kept.across_bytes < averaged.across_bytes
    assert (averaged.across_bytes - kept.across_bytes) % 4 == 0
