"""The outer step of a run across nodes (hparam outer_every > 0, on more than one node).

Inside a node every step is the synchronous step (update.step), over the node's ranks. Between
nodes nothing moves for `outer_every` steps; then the ranks that hold the same parameters (one
per node, exchange.ranks.NodeGroups.across) average what each node changed since the last outer
step and take an outer step on that average, with Nesterov momentum as DiLoCo does:

    g = mean over nodes of (A - theta_node)     A: the weights of the last outer step
    m = outer_momentum * m + g
    A = A - outer_lr * (g + outer_momentum * m)
    theta_node = A on every node

outer_lr 1 with outer_momentum 0 is plain averaging (local SGD). The rest of the state at an
outer step (docs/design.md, "Across nodes"):
- Adagrad's accumulators: averaged over the nodes, so that every node goes on from the same
  state and one copy of it is the run's (a checkpoint holds one).
- The EMA: moved only at outer steps, towards the new A, by what `outer_every` steps of its
  decay would have moved it towards weights that stood still: between outer steps the nodes'
  weights are no model anyone agreed on. Every node computes the same EMA, without exchanging it.
- The learning-rate schedule and the step count: alike on every node already (evaluations and
  checkpoints wait for an outer step).
- The LSTM's row states: each rank's own, as always; they carry on.

Each rank does the outer step for the rows it owns: vocabulary-parallel, the rows of the tables
it holds; of a parameter every rank of a node holds whole (the LSTM; replicated, the tables),
its 1/K of the rows, which the node then gathers. The outer state (the anchors A, the
accumulators at A, the momentum) is kept for the owned rows only.

What crosses between nodes is only the rows that some node changed since the last outer step
(weights or accumulators): a row no node changed has a delta of 0 and the same accumulator on
every node, so its average is known without sending it. The rows are found by comparing with
the anchors at the outer step (nothing is tracked during the steps, so nothing more is
checkpointed), their union over the nodes is one allreduce of a float per row, and then one
grouped allreduce carries those rows' deltas and accumulator increments (as fp16 with hparam
outer_fp16, the increments scaled by their row's largest). The result is the dense formula's,
row for row.
"""
import typing

import numpy as np
import tensorflow as tf

from lm1b_hvd.exchange import collectives
from lm1b_hvd.model import tables
from lm1b_hvd.update.outer_parts import owned


class OuterStep:
    """The outer steps of a run.state.TrainingState between the nodes of `nodes`
    (exchange.ranks.NodeGroups), with hparams outer_lr and outer_momentum."""

    def __init__(self, state, nodes, hps):
        self.state, self.nodes = state, nodes
        self.lr, self.momentum_rate, self.fp16 = hps.outer_lr, hps.outer_momentum, hps.outer_fp16
        self.parts, self.momentum = state.outer_momentum.parts, state.outer_momentum.variables
        self.accumulators = [state.optimizer.slot_of(part.variable) for part in self.parts]
        # The outer state of the owned rows: the weights and accumulators of the last outer step.
        self.anchors = [tf.Variable(owned(part.variable, part.rows), trainable=False) for part in self.parts]
        self.anchor_accumulators = [tf.Variable(owned(accumulator, part.rows), trainable=False)
                                    for part, accumulator in zip(self.parts, self.accumulators)]
        self.last_step = None

    def start(self):
        """Every node takes node 0's weights and accumulators (after a restore or at the first
        step), and they become the anchors. A collective over every rank."""
        root = self.nodes.across.global_ranks[0]
        rows = ([owned(part.variable, part.rows) for part in self.parts]
                + [owned(accumulator, part.rows) for part, accumulator in zip(self.parts, self.accumulators)])
        synced = collectives.broadcast_tensors(rows, root, self.nodes.across)
        for anchor, value in zip(self.anchors + self.anchor_accumulators, synced):
            anchor.assign(value)
        self._settle()
        self.last_step = int(self.state.step)

    def step(self):
        """The outer step at this step (every rank calls it at the same step); returns what
        crossed between the nodes (an OuterExchange)."""
        step = int(self.state.step)
        # What this node changed since the last outer step, and the rows any node changed.
        deltas = [anchor - owned(part.variable, part.rows) for part, anchor in zip(self.parts, self.anchors)]
        increments = [owned(accumulator, part.rows) - anchor
                      for part, accumulator, anchor in zip(self.parts, self.accumulators, self.anchor_accumulators)]
        changed, scales = self._union([row_scales(delta, increment) for delta, increment in zip(deltas, increments)])

        # The nodes' average of those rows, the others' being 0.
        mean_deltas, mean_increments, exchange = self._average(deltas, increments, changed, scales)

        # The outer update, and every node from its result.
        for anchor, momentum, delta in zip(self.anchors, self.momentum, mean_deltas):
            momentum.assign(self.momentum_rate * momentum + delta)
            anchor.assign_sub(self.lr * (delta + self.momentum_rate * momentum))
        for anchor, rows, increment in zip(self.anchor_accumulators, changed, mean_increments):
            anchor.scatter_nd_add(rows[:, None], increment)
        self._settle()
        self.state.ema.update(steps=step - self.last_step)
        self.last_step = step
        return exchange

    def _average(self, deltas, increments, changed, scales):
        """The average over the nodes of each part's deltas (whole) and accumulator increments
        (of its `changed` rows), from one grouped allreduce of the changed rows of both. In
        fp16, an increment travels divided by its row's `scales`: a frequent word's increments
        over an outer period pass fp16's largest value (65,504) many times over."""
        sending = [index for index, rows in enumerate(changed) if rows.shape[0]]
        scaled = [tables.per_row(scales[index], increments[index]) if self.fp16 else 1.0 for index in sending]
        sent = ([tf.gather(deltas[index], changed[index]) for index in sending]
                + [tf.gather(increments[index], changed[index]) / scale for index, scale in zip(sending, scaled)])
        averaged = collectives.average_dense(sent, fp16=self.fp16, ranks=self.nodes.across) if sent else []
        mean_deltas = [tf.zeros_like(delta) for delta in deltas]
        mean_increments = [tf.gather(increment, rows) for increment, rows in zip(increments, changed)]  # empty ones
        for index, delta, increment, scale in zip(sending, averaged[:len(sending)], averaged[len(sending):], scaled):
            mean_deltas[index] = tf.scatter_nd(changed[index][:, None], delta, deltas[index].shape)
            mean_increments[index] = increment * scale
        owned_rows = sum(part.rows.count for part in self.parts)
        exchange = OuterExchange(
            rows_changed=sum(int(rows.shape[0]) for rows in changed), rows_owned=owned_rows,
            across_bytes=4 * owned_rows + sum(tensor.shape.num_elements() for tensor in sent) * (2 if self.fp16 else 4))
        return mean_deltas, mean_increments, exchange

    def _union(self, scales):
        """Each part's rows (int64 numbers, sorted) that any node changed, and their scales (the
        largest of the nodes' row_scales): one allreduce (max) of a float a row."""
        largest = collectives.maximum(tf.concat(scales, 0), self.nodes.across)
        per_part = tf.split(largest, [part.rows.count for part in self.parts])
        changed = [tf.where(part > 0)[:, 0] for part in per_part]
        return changed, [tf.gather(part, rows) for part, rows in zip(per_part, changed)]

    def roll_back(self):
        """Every rank back to the last outer step: its weights, accumulators and step (a stop
        between outer steps, whose checkpoint is the last outer step's). A collective over
        the node's ranks."""
        self._settle()
        self.state.optimizer.iterations.assign(self.last_step)

    def _settle(self):
        """The node's variables take the anchors: a rank's own rows, and the rows its node's
        other ranks own of what every rank of the node holds whole."""
        for part, accumulator, anchor, anchor_accumulator in zip(self.parts, self.accumulators, self.anchors,
                                                                 self.anchor_accumulators):
            for target, value in ((part.variable, anchor), (accumulator, anchor_accumulator)):
                target.assign(collectives.allgather(value, self.nodes.node) if part.gathered else value)

    def inside_bytes(self):
        """Bytes this rank receives from its node's ranks after an outer step (the rows they own
        of what it holds whole), counted from the tensors."""
        return sum(2 * (part.variable.shape.num_elements() - anchor.shape.num_elements()) * anchor.dtype.size
                   for part, anchor in zip(self.parts, self.anchors) if part.gathered)


class OuterExchange(typing.NamedTuple):
    """What one rank's outer step sent between the nodes: its owned rows, how many of them some
    node had changed, and the bytes it sent to be allreduced: a flag per owned row, then every
    changed row's delta and accumulator increment."""
    rows_changed: int
    rows_owned: int
    across_bytes: int


def row_scales(delta, increment):
    """Per row, 0 where it did not change (its delta and accumulator increment 0), else its
    largest accumulator increment (the smallest float if that is 0): what its increments are
    divided by in fp16."""
    def per_row(tensor):
        return tf.reduce_max(tf.abs(tf.reshape(tensor, [tensor.shape[0], -1])), axis=1)
    changed = tf.cast(per_row(delta) > 0, tf.float32) * np.finfo(np.float32).tiny
    return tf.maximum(per_row(increment), changed)

