"""Two levels across nodes (hparam outer_every, update.outer), with real `horovodrun` ranks
grouped into simulated nodes (--ranks_per_node): on one node it is the synchronous run; at 2
nodes x 2 ranks each outer step is docs/design.md's formula, in both modes; a run stopped
between outer steps resumes exactly; two-level and synchronous runs resume each other."""
import shutil

import numpy as np
import pytest

from tests.helpers import (DROPOUT, assert_same_variables, horovodrun, run, saved_variables, train, train_command,
                           without_run_position)
from tests.workers import outer_step as worker

pytestmark = pytest.mark.slow  # trains for minutes: not in `pytest -m "not slow"`

H = 3
OUTER_LR, OUTER_MOMENTUM = 0.7, 0.9
TABLES = ("emb", "softmax_w", "softmax_b")


def node_matrix(ranks, when, name, vocab_parallel):
    """The logical matrix `name` of one node at `when`, from its ranks' saved values: the rows
    each rank holds side by side, vocabulary-parallel; else any rank's (they hold it alike)."""
    base = name.split("_slot")[0].split("_average")[0]
    if vocab_parallel and base in TABLES:
        return np.concatenate([rank[f"{when}/{name}"] for rank in ranks]).astype(np.float64)
    for rank in ranks[1:]:  # the node's ranks hold the same values
        np.testing.assert_allclose(rank[f"{when}/{name}"], ranks[0][f"{when}/{name}"], rtol=0, atol=1e-6, err_msg=name)
    return ranks[0][f"{when}/{name}"].astype(np.float64)


def weight_names(saved):
    """The names of the trained weights in a rank's saved values: the LSTM's and the tables'."""
    lstm = sorted({key.split("/")[1] for key in saved if key.startswith("start/lstm_") and "slot" not in key})
    return lstm + [name for name in TABLES if f"start/{name}" in saved]


@pytest.mark.every_stack
def test_each_outer_step_is_the_average_of_the_nodes_deltas_with_nesterov_momentum(tmp_path):
    result = horovodrun(["-m", "tests.workers.outer_step", str(tmp_path), str(H), str(OUTER_LR), str(OUTER_MOMENTUM)],
                        np_=4, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    saved = {mode: [dict(np.load(tmp_path / f"{mode}{rank}.npz")) for rank in range(4)] for mode in worker.MODES}
    for mode, setting in worker.MODES.items():
        if setting.get("outer_fp16"):
            continue
        check_outer_steps(saved[mode], vocab_parallel=setting.get("vocab_parallel", False),
                          kept_slots=setting.get("outer_slots") == "local", bits=setting.get("outer_bits", 16))
        changed = np.array([rank["exchange/rows_changed"] for rank in saved[mode]])
        owned = np.array([rank["exchange/rows_owned"] for rank in saved[mode]])
        # Some rows were changed by neither node, and did not travel: the formula held for them too.
        assert (changed <= owned).all() and (changed < owned).any(), (mode, changed, owned)
    check_fp16_outer_step(saved["vocab_parallel"], saved["vocab_parallel_fp16"])
    # A delta's value in 1 byte at 8 bits and half a byte at 4 instead of fp32's 4, and a float a
    # row for its scale, which weighs much on this model's narrow rows; Adagrad's accumulators
    # kept per node send nothing, averaged ones their increments (in fp32 here).
    for mode, plain, at_most in (("replicated_local_8", "replicated_local", 0.6),
                                 ("vocab_parallel_4", "vocab_parallel", 0.7), ("replicated_local", "replicated", 0.6)):
        for quantized_rank, plain_rank in zip(saved[mode], saved[plain]):
            assert quantized_rank["exchange/across_bytes"][0] < at_most * plain_rank["exchange/across_bytes"][0], mode


def test_an_overlapped_outer_step_is_the_eager_update_with_the_mean_one_period_late(tmp_path):
    """Under MPI, the exchange beside the next period (hparam outer_overlap): each node's start of
    the next period from the anchor, its fresh change and the others' of the period before; the
    anchor by the true mean one period late (update.eager_outer), in fp32 and in 8 bits."""
    result = horovodrun(["-m", "tests.workers.outer_step", str(tmp_path), str(H), str(OUTER_LR), str(OUTER_MOMENTUM),
                         "overlapped"], np_=4, controller="--mpi", timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for mode, setting in worker.OVERLAPPED.items():
        saved = [dict(np.load(tmp_path / f"{mode}{rank}.npz")) for rank in range(4)]
        check_eager_outer_steps(saved, vocab_parallel=setting.get("vocab_parallel", False),
                                bits=setting.get("outer_bits", 16))


def check_eager_outer_steps(ranks, vocab_parallel, bits):
    nodes = [ranks[:worker.RANKS_PER_NODE], ranks[worker.RANKS_PER_NODE:]]
    weights = weight_names(ranks[0])

    def matrix(node, when, name):
        return node_matrix(node, when, name, vocab_parallel)

    anchor = {name: matrix(nodes[0], "start", name) for name in weights}
    momentum = {name: np.zeros_like(value) for name, value in anchor.items()}
    last = {name: np.zeros_like(value) for name, value in anchor.items()}
    own = {name: [np.zeros_like(value) for _ in nodes] for name, value in anchor.items()}
    in_flight = {name: None for name in weights}
    residuals = {name: ([np.zeros_like(value, np.float32) for _ in nodes], np.zeros_like(value, np.float32))
                 for name, value in anchor.items()}
    average = {name: matrix(nodes[0], "start", f"ema_{name.split('_')[1]}" if name.startswith("lstm_")
                            else f"{name}_average") for name in weights}
    ema_rate = 1.0 - worker.HPS.ema_decay ** H
    for outer in range(1, worker.OUTER_STEPS + 1):
        before, after, last_when = f"before{outer}", f"after{outer}", "start" if outer == 1 else f"after{outer - 1}"
        for name in weights:
            average_name = f"ema_{name.split('_')[1]}" if name.startswith("lstm_") else f"{name}_average"
            changes = [matrix(node, last_when, name).astype(np.float32) - matrix(node, before, name).astype(np.float32)
                       for node in nodes]
            if in_flight[name] is not None:  # the period before's mean arrived: the anchor takes it
                momentum[name] = OUTER_MOMENTUM * momentum[name] + in_flight[name]
                anchor[name] = anchor[name] - OUTER_LR * (in_flight[name] + OUTER_MOMENTUM * momentum[name])
                last[name] = in_flight[name]
                average[name] = average[name] + ema_rate * (anchor[name] - average[name])
            in_flight[name] = (np.mean(changes, axis=0) if bits == 16
                               else quantized_mean(changes, bits, *residuals[name]).astype(np.float64))
            for index, (node, change) in enumerate(zip(nodes, changes)):
                estimate = last[name] + (change - own[name][index]) / len(nodes)
                expected = anchor[name] - OUTER_LR * (estimate + OUTER_MOMENTUM * (OUTER_MOMENTUM * momentum[name]
                                                                                  + estimate))
                np.testing.assert_allclose(matrix(node, after, name), expected, rtol=0, atol=1e-5,
                                           err_msg=f"{name} of node {index} after outer step {outer}")
                np.testing.assert_allclose(matrix(node, after, average_name), average[name], rtol=0, atol=1e-5,
                                           err_msg=f"{average_name} after outer step {outer}")
                own[name][index] = change
            assert not np.allclose(matrix(nodes[0], after, name), matrix(nodes[1], after, name)), (
                f"the nodes start the next period alike: {name}")


def check_fp16_outer_step(fp32, fp16):
    """With outer_fp16 the first outer step starts from the same weights as in fp32, sends half
    the bytes per changed row, and lands within fp16's rounding of the deltas and (scaled by
    their row's largest) of the accumulator increments, not exactly."""
    for rank32, rank16 in zip(fp32, fp16):
        np.testing.assert_array_equal(rank16["exchange/rows_changed"][0], rank32["exchange/rows_changed"][0])
        assert rank16["exchange/across_bytes"][0] < 0.6 * rank32["exchange/across_bytes"][0]
    nodes32, nodes16 = [fp32[:2], fp32[2:]], [fp16[:2], fp16[2:]]
    differs = False
    for name in weight_names(fp32[0]):
        before = [node_matrix(node, "before1", name, True) for node in nodes32]
        for node, node_before in zip(nodes16, before):
            np.testing.assert_array_equal(node_matrix(node, "before1", name, True), node_before)
        start = node_matrix(nodes32[0], "start", name, True)
        largest_delta = np.abs(np.stack([start - theta for theta in before])).max()
        rounding = OUTER_LR * (1 + OUTER_MOMENTUM) * largest_delta * 2.0 ** -10  # fp16 keeps 11 bits
        after32 = node_matrix(nodes32[0], "after1", name, True)
        for node in nodes16:
            after16 = node_matrix(node, "after1", name, True)
            np.testing.assert_allclose(after16, after32, rtol=0, atol=rounding + 1e-7, err_msg=name)
            differs = differs or not np.array_equal(after16, after32)
        slot = f"lstm_slot_{name.split('_')[1]}" if name.startswith("lstm_") else f"{name}_slot"
        increments = [node_matrix(node, "before1", slot, True) - node_matrix(node, "start", slot, True)
                      for node in nodes32]
        row_largest = np.abs(np.stack(increments)).reshape(2, len(increments[0]), -1).max(axis=(0, 2))
        rounding = row_largest.reshape([-1] + [1] * (increments[0].ndim - 1)) * 2.0 ** -10
        for node in nodes16:
            error = np.abs(node_matrix(node, "after1", slot, True) - node_matrix(nodes32[0], "after1", slot, True))
            assert (error <= rounding + 1e-6 * np.abs(node_matrix(nodes32[0], "after1", slot, True))).all(), slot
    assert differs, "the fp16 outer step gave the fp32 one's weights exactly: nothing was rounded"


def quantized_mean(deltas, bits, sent_residuals, received_residual):
    """The nodes' mean of `deltas` (one fp32 matrix a node) as update.outer_exchange sends it in
    `bits`: each node's rows plus its residual quantized, their mean in float32 plus the
    residual of the node that averages the row quantized again; the residuals updated in place.
    Which node averages a row does not change its numbers: a row is quantized alone."""
    def quantized(rows):
        flat = rows.reshape(len(rows), -1)
        scales = (np.abs(flat).max(axis=1) / quantized_levels[bits]).astype(np.float32)
        levels = np.clip(np.round(flat / np.where(scales > 0, scales, 1)[:, None]), -quantized_levels[bits],
                         quantized_levels[bits])
        return (levels.astype(np.float32) * scales[:, None]).reshape(rows.shape)

    quantized_levels = {8: 127, 4: 7}
    summed = np.zeros_like(deltas[0])
    for node, delta in enumerate(deltas):
        owing = delta + sent_residuals[node]
        sent = quantized(owing)
        sent_residuals[node] = owing - sent
        summed = summed + sent
    owing = summed / np.float32(len(deltas)) + received_residual
    mean = quantized(owing)
    received_residual[...] = owing - mean
    return mean


def check_outer_steps(ranks, vocab_parallel, kept_slots=False, bits=16):
    """Each outer step from the weights each node held before it (fp32, as the nodes subtract
    them): the average of the nodes' changes in fp32 (or quantized in `bits`, with each node's
    residuals), Nesterov's momentum, every node from the result; the slots averaged (or each
    node's kept), the averages moved."""
    nodes = [ranks[:worker.RANKS_PER_NODE], ranks[worker.RANKS_PER_NODE:]]
    weights = weight_names(ranks[0])
    assert len(weights) >= 6
    averages = {name: f"ema_{name.split('_')[1]}" if name.startswith("lstm_") else f"{name}_average"
                for name in weights}
    slots = {name: f"lstm_slot_{name.split('_')[1]}" if name.startswith("lstm_") else f"{name}_slot"
             for name in weights}

    def matrix(node, when, name):
        return node_matrix(node, when, name, vocab_parallel)

    for name in weights:  # every node starts from the same weights
        np.testing.assert_array_equal(matrix(nodes[1], "start", name), matrix(nodes[0], "start", name))
    momentum = {name: np.zeros_like(matrix(nodes[0], "start", name)) for name in weights}
    residuals = {name: ([np.zeros_like(momentum[name], np.float32) for _ in nodes],
                        np.zeros_like(momentum[name], np.float32)) for name in weights}
    ema_rate = 1.0 - worker.HPS.ema_decay ** H
    for outer in range(1, worker.OUTER_STEPS + 1):
        before, after, last = f"before{outer}", f"after{outer}", "start" if outer == 1 else f"after{outer - 1}"
        for name in weights:
            anchor = matrix(nodes[0], last, name)
            thetas = [matrix(node, before, name) for node in nodes]
            assert not np.allclose(thetas[0], thetas[1]), f"the nodes trained alike before outer step {outer}: {name}"
            changes = [(anchor.astype(np.float32) - theta.astype(np.float32)) for theta in thetas]
            delta = (np.mean(changes, axis=0) if bits == 16
                     else quantized_mean(changes, bits, *residuals[name]).astype(np.float64))
            momentum[name] = OUTER_MOMENTUM * momentum[name] + delta
            expected = anchor - OUTER_LR * (delta + OUTER_MOMENTUM * momentum[name])
            accumulators = [matrix(node, before, slots[name]) for node in nodes]
            average_before = matrix(nodes[0], before, averages[name])
            for node, accumulator in zip(nodes, accumulators):
                np.testing.assert_allclose(matrix(node, after, name), expected,
                                           rtol=0, atol=1e-5, err_msg=f"{name} after outer step {outer}")
                np.testing.assert_allclose(matrix(node, after, slots[name]),
                                           accumulator if kept_slots else np.mean(accumulators, axis=0),
                                           rtol=0, atol=1e-5, err_msg=f"{slots[name]} after outer step {outer}")
                np.testing.assert_allclose(matrix(node, after, averages[name]),
                                           average_before + ema_rate * (expected - average_before),
                                           rtol=0, atol=1e-5, err_msg=f"{averages[name]} after outer step {outer}")
            if kept_slots:
                assert not np.allclose(accumulators[0], accumulators[1]), f"the nodes' {slots[name]} are alike"
            if outer > 1:  # the average stands still between outer steps
                previous = matrix(nodes[0], f"after{outer - 1}", averages[name])
                np.testing.assert_array_equal(average_before, previous)


# From the command line, as a user runs it.
REPLICATED = DROPOUT
VOCAB_PARALLEL = DROPOUT + ",vocab_parallel=true"
# Each node its own Adagrad accumulators, the residuals of an 8-bit exchange, and its start and
# change of an overlapped exchange (an MPI launch).
KEPT_PER_NODE = DROPOUT + ",outer_slots=local,outer_bits=8,outer_overlap=true"
EVERY = 4


def train_nodes(corpus, logdir, max_steps, hpconfig, ranks=4, ranks_per_node=2):
    """A run of `ranks` ranks in simulated nodes of `ranks_per_node` (through MPI when it overlaps
    its outer exchange)."""
    return train(corpus, logdir, "--ranks_per_node", ranks_per_node, max_steps=max_steps, hpconfig=hpconfig,
                 ranks=ranks, controller="--mpi" if "outer_overlap=true" in hpconfig else "--gloo")


def test_on_one_node_outer_steps_are_off_and_the_run_is_the_synchronous_one(tiny_corpus, tmp_path):
    steps = 30
    synchronous, one_node = tmp_path / "synchronous", tmp_path / "one-node"
    train_nodes(tiny_corpus, synchronous, steps, REPLICATED, ranks=2, ranks_per_node=0)
    out = train_nodes(tiny_corpus, one_node, steps, REPLICATED + ",outer_every=8,outer_lr=0.5,outer_momentum=0.5",
                      ranks=2, ranks_per_node=0)
    assert ("outer_every=8: all 2 rank(s) are on one node, nothing to average between nodes: every step is "
            "synchronous") in out
    assert_same_variables(saved_variables(synchronous, steps), saved_variables(one_node, steps), atol=1e-5)


@pytest.mark.parametrize("hpconfig", [KEPT_PER_NODE, VOCAB_PARALLEL], ids=["kept_per_node", "vocab_parallel"])
def test_stopped_between_outer_steps_resumes_exactly_and_either_way_to_synchronous(tiny_corpus, tmp_path, hpconfig):
    """An outer step every 4 steps: a run stopped at step 10 keeps step 8's checkpoint and,
    resumed to 12, equals the unbroken run; replicated on 2 nodes of 1 rank, each keeping its
    own Adagrad accumulators, the residuals of an 8-bit exchange and its overlapped exchange's
    start and change (each node's copy in the checkpoint; the exchange in flight at the stop
    finished and its mean saved), and on one node the run takes node 0's; vocabulary-parallel on
    2 x 2 (its tables and momentum written in parts), that checkpoint resumes re-grouped as 4
    nodes of 1 rank and synchronous, and a synchronous checkpoint resumes two-level, with the
    same weights."""
    two_level = hpconfig + f",outer_every={EVERY}"
    ranks, per_node = (2, 1) if hpconfig == KEPT_PER_NODE else (4, 2)
    unbroken, resumed = tmp_path / "unbroken", tmp_path / "resumed"
    out = train_nodes(tiny_corpus, unbroken, 3 * EVERY, two_level, ranks, per_node)
    assert (f"two-level: 2 nodes x {per_node} rank(s); every step inside a node, an outer step between nodes every "
            f"{EVERY} steps") in out
    out = train_nodes(tiny_corpus, resumed, 2 * EVERY + 2, two_level, ranks, per_node)
    assert (f"stopped at step {2 * EVERY + 2}, between outer steps: the checkpoint is the last outer step's, step "
            f"{2 * EVERY} (a resume repeats steps {2 * EVERY + 1}-{2 * EVERY + 2})") in out
    at_outer_step = saved_variables(resumed, 2 * EVERY)
    assert any(name.startswith("outer_momentum/") for name in at_outer_step)
    synchronous = shutil.copytree(resumed, tmp_path / "synchronous", ignore=shutil.ignore_patterns("eval", "train"))
    out = train_nodes(tiny_corpus, resumed, 3 * EVERY, two_level, ranks, per_node)
    assert (f"resumed from {resumed}/ckpt-{2 * EVERY} at step {2 * EVERY} (epoch 0, the same data position and "
            "LSTM rows)") in out
    assert_same_variables(saved_variables(unbroken, 3 * EVERY), saved_variables(resumed, 3 * EVERY))

    if hpconfig == KEPT_PER_NODE:
        copies = {name.split("/")[1] for name in at_outer_step if name.startswith("nodes/")}
        assert copies == {"0", "1"}, "each node's copy of what it keeps"
        assert not np.array_equal(at_outer_step["nodes/0/tables/embedding/adagrad_accumulator"],
                                  at_outer_step["nodes/1/tables/embedding/adagrad_accumulator"])
        out = train_nodes(tiny_corpus, synchronous, 2 * EVERY, REPLICATED, ranks=2, ranks_per_node=0)
        assert ("the checkpoint's run was two-level (2 nodes x 1 ranks): its outer momentum is not used; the "
                "checkpoint's 2 nodes kept their own Adagrad accumulators: this run starts from node 0's") in out
        again = saved_variables(synchronous, 2 * EVERY)
        np.testing.assert_array_equal(again["tables/embedding/adagrad_accumulator"],
                                      at_outer_step["nodes/0/tables/embedding/adagrad_accumulator"])
        return
    # Re-grouped: 4 nodes of 1 rank read the 2 x 2 checkpoint, each rank the momentum of the rows
    # it owns now, and save it again at its step: the same values.
    regrouped = shutil.copytree(synchronous, tmp_path / "regrouped")
    out = train_nodes(tiny_corpus, regrouped, 2 * EVERY, two_level, ranks_per_node=1)
    assert ("the checkpoint's run had 2 nodes x 2 ranks, this one 4 x 1: each rank reads the outer momentum of the "
            "rows it owns now") in out
    assert_same_variables(without_run_position(at_outer_step), without_run_position(
        saved_variables(regrouped, 2 * EVERY)))
    # Synchronous from the two-level checkpoint (saved again at its step: the same weights, no
    # momentum), and two-level from that synchronous one (the momentum starts at zero).
    out = train_nodes(tiny_corpus, synchronous, 2 * EVERY, hpconfig)
    assert "the checkpoint's run was two-level (2 nodes x 2 ranks): its outer momentum is not used" in out
    again = saved_variables(synchronous, 2 * EVERY)
    assert_same_variables(without_run_position({name: value for name, value in at_outer_step.items()
                                                            if not name.startswith("outer_momentum/")}),
                                      without_run_position(again))
    out = train_nodes(tiny_corpus, synchronous, 2 * EVERY, two_level)
    assert "the checkpoint's run was synchronous: the outer momentum starts at zero" in out
    assert_same_variables(
        without_run_position({name: np.zeros_like(value) if name.startswith("outer_momentum/") else value
                              for name, value in at_outer_step.items()}),
        without_run_position(saved_variables(synchronous, 2 * EVERY)))


def test_an_overlapped_exchange_under_gloo_is_one_line_that_says_how_to_launch_and_writes_nothing(tiny_corpus,
                                                                                                   tmp_path):
    logdir = tmp_path / "log"
    result = run(train_command(tiny_corpus, logdir, "--ranks_per_node", 1, max_steps=4,
                               hpconfig=REPLICATED + ",outer_every=4,outer_slots=local,outer_overlap=true", ranks=2))
    assert result.returncode != 0
    said = [line.split(">:", 1)[1] for line in result.stderr.splitlines() if ">:error: " in line]
    assert said and set(said) == {
        "error: hparam 'outer_overlap' needs a launch through MPI (horovodrun --mpi, mpirun, or srun --mpi=pmix): "
        "its exchange runs on an MPI communicator of its own beside Horovod's collectives, which run on one thread; "
        "launch so, or drop outer_overlap"}, result.stderr[-2000:]
    assert not [line for line in result.stderr.splitlines() if ">:Traceback" in line]  # horovodrun's own aside
    assert not logdir.exists()


def test_fp16_two_level_is_one_line_and_writes_nothing(tiny_corpus, tmp_path):
    logdir = tmp_path / "log"
    result = run(train_command(tiny_corpus, logdir, "--ranks_per_node", 1, max_steps=4,
                               hpconfig=REPLICATED + ",outer_every=4,precision=fp16", ranks=2))
    assert result.returncode != 0
    assert ("error: outer_every=4 cannot be used with precision=fp16: each node's loss scale would drift from the "
            "others'; use precision=bf16 or fp32") in result.stderr
    assert not logdir.exists()
