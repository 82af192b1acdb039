"""The outer step of a run across nodes (hparam outer_every > 0, on more than one node).

Inside a node every step is the synchronous step (update.step), over the node's ranks. Between
nodes nothing moves for `outer_every` steps; then the ranks that hold the same parameters (one
per node, exchange.collectives.NodeGroups.across) average what each node changed since the last outer
step and take an outer step on that average, with Nesterov momentum as DiLoCo does:

    g = mean over nodes of (A - theta_node)     A: the weights of the last outer step
    m = outer_momentum * m + g
    A = A - outer_lr * (g + outer_momentum * m)
    theta_node = A on every node

outer_lr 1 with outer_momentum 0 is plain averaging (local SGD). What happens to the rest of the
state is what each of its pieces says (model.pieces.Travel; docs/design.md, "Across nodes"):
- a slot of a weight (Adagrad's accumulators) is AVERAGED over the nodes, so that every node
  goes on from the same state and one copy of it is the run's, or KEPT_PER_NODE;
- the averages (the EMA) FOLLOW: moved only at outer steps, towards the new A, by what
  `outer_every` steps of their decay would have moved them towards weights that stood still
  (between outer steps the nodes' weights are no model anyone agreed on); every node computes
  the same, without exchanging them;
- what is ALIKE on every node already (the step count, the learning rate and its schedule) is
  remembered at each outer step, for a stop between outer steps to go back to;
- what is each rank's own (the data position, the LSTM's row states) carries on.

Each rank does the outer step for the rows it owns: vocabulary-parallel, the rows of the tables
it holds; of a parameter every rank of a node holds whole (the LSTM; replicated, the tables),
its 1/K of the rows, which the node then gathers. The outer state (the anchors A, the
accumulators at A, the momentum) is kept for the owned rows only.

What crosses between nodes is only the rows that some node changed since the last outer step
(weights or averaged slots): a row no node changed has a delta of 0 and the same accumulator on
every node, so its average is known without sending it. The rows are found by comparing with
the anchors at the outer step (nothing is tracked during the steps, so nothing more is
checkpointed), their union over the nodes is one allreduce of a float per row, and then one
grouped allreduce carries those rows' deltas and averaged slots' increments (as fp16 with
hparam outer_fp16, each slot's increments scaled by their row's largest). The result is the dense formula's,
row for row.
"""
import typing

import numpy as np
import tensorflow as tf

from lm1b_hvd.exchange import collectives
from lm1b_hvd.model import averaging, tables
from lm1b_hvd.model.pieces import Travel
from lm1b_hvd.update.outer_parts import OwnedPart, owned


class Family(typing.NamedTuple):
    """A weight's rows this rank owns (`part`), the slots that go with them (whose changes the
    nodes average, and those each node keeps), and the anchors: their owned rows as they were
    at the last outer step, in the order of `targets`."""
    part: OwnedPart
    averaged: list
    kept: list
    anchors: list

    @property
    def targets(self):
        return [self.part.variable, *self.averaged, *self.kept]

    @property
    def averaged_anchors(self):
        return self.anchors[1:1 + len(self.averaged)]

    @property
    def kept_anchors(self):
        return self.anchors[1 + len(self.averaged):]


class OuterStep:
    """The outer steps of a run.state.TrainingState between the nodes of `nodes`
    (exchange.collectives.NodeGroups), with hparams outer_lr, outer_momentum, outer_fp16 and
    ema_decay, on the rows `momentum` (update.outer_parts.OuterMomentum) owns of the state's
    STEPPED pieces; every other piece as its travel says."""

    def __init__(self, state, nodes, hps, momentum):
        self.state, self.nodes = state, nodes
        self.lr, self.momentum_rate, self.fp16 = hps.outer_lr, hps.outer_momentum, hps.outer_fp16
        self.ema_decay = hps.ema_decay
        self.momentum = momentum.variables
        slots = _slots_by_weight(state.of(Travel.AVERAGED, Travel.KEPT_PER_NODE))
        self.families = []
        for part in momentum.parts:
            averaged, kept = (slots.get((part.variable.ref(), travel), [])
                              for travel in (Travel.AVERAGED, Travel.KEPT_PER_NODE))
            anchors = [tf.Variable(owned(target, part.rows), trainable=False)
                       for target in (part.variable, *averaged, *kept)]
            self.families.append(Family(part, averaged, kept, anchors))
        self.followers = [(average, weight) for piece in state.of(Travel.FOLLOWS)
                          for average, weight in zip(piece.variables, piece.slot_of)]
        self.alike = state.of(Travel.ALIKE)
        self.alike_then = []  # the ALIKE pieces' values at the last outer step
        self.last_step = None

    def start(self):
        """Every node takes node 0's weights and slots (after a restore or at the first step),
        and they become the anchors. A collective over every rank."""
        root = self.nodes.across.global_ranks[0]
        rows = [owned(target, family.part.rows) for family in self.families for target in family.targets]
        synced = iter(collectives.broadcast_tensors(rows, root, self.nodes.across))
        for family in self.families:
            for anchor in family.anchors:
                anchor.assign(next(synced))
        self._settle()
        self._remember_alike()

    def step(self):
        """The outer step at this step (every rank calls it at the same step); returns what
        crossed between the nodes (an OuterExchange)."""
        step = int(self.state.step)
        # What this node changed since the last outer step, and the rows any node changed.
        deltas = [family.anchors[0] - owned(family.part.variable, family.part.rows) for family in self.families]
        increments = [[owned(slot, family.part.rows) - anchor
                       for slot, anchor in zip(family.averaged, family.averaged_anchors)] for family in self.families]
        changed, scales = self._union([row_scales(delta, slot_increments)
                                       for delta, slot_increments in zip(deltas, increments)])

        # The nodes' average of those rows, the others' being 0.
        mean_deltas, mean_increments, exchange = self._average(deltas, increments, changed, scales)

        # The outer update, and every node from its result.
        for family, momentum, delta in zip(self.families, self.momentum, mean_deltas):
            momentum.assign(self.momentum_rate * momentum + delta)
            family.anchors[0].assign_sub(self.lr * (delta + self.momentum_rate * momentum))
        for family, rows, slot_increments in zip(self.families, changed, mean_increments):
            for anchor, increment in zip(family.averaged_anchors, slot_increments):
                anchor.scatter_nd_add(rows[:, None], increment)
            for anchor, slot in zip(family.kept_anchors, family.kept):
                anchor.assign(owned(slot, family.part.rows))
        self._settle()
        averaging.move_towards(self.followers, self.ema_decay, steps=step - self.last_step)
        self._remember_alike()
        return exchange

    def _average(self, deltas, increments, changed, scales):
        """The average over the nodes of each family's delta (whole) and averaged slots'
        increments (of its `changed` rows), from one grouped allreduce of the changed rows of
        all. In fp16, an increment travels divided by its row's `scales`: a frequent word's
        accumulator increments over an outer period pass fp16's largest value (65,504) many
        times over."""
        sending = [index for index, rows in enumerate(changed) if rows.shape[0]]
        divisors = {(index, slot): tables.per_row(scales[index][slot], increments[index][slot]) if self.fp16 else 1.0
                    for index in sending for slot in range(len(increments[index]))}
        sent = ([tf.gather(deltas[index], changed[index]) for index in sending]
                + [tf.gather(increments[index][slot], changed[index]) / divisor
                   for (index, slot), divisor in divisors.items()])
        averaged = collectives.average_dense(sent, fp16=self.fp16, ranks=self.nodes.across) if sent else []
        mean_deltas = [tf.zeros_like(delta) for delta in deltas]
        mean_increments = [[tf.gather(increment, rows) for increment in slot_increments]  # empty ones
                           for slot_increments, rows in zip(increments, changed)]
        for index, delta in zip(sending, averaged[:len(sending)]):
            mean_deltas[index] = tf.scatter_nd(changed[index][:, None], delta, deltas[index].shape)
        for ((index, slot), divisor), increment in zip(divisors.items(), averaged[len(sending):]):
            mean_increments[index][slot] = increment * divisor
        exchange = OuterExchange(
            rows_changed=sum(int(rows.shape[0]) for rows in changed),
            rows_owned=sum(family.part.rows.count for family in self.families),
            across_bytes=4 * self.flag_count() + sum(tensor.shape.num_elements() for tensor in sent) * (
                2 if self.fp16 else 4))
        return mean_deltas, mean_increments, exchange

    def flag_count(self):
        """The floats per outer step that say which rows changed: one per owned row and averaged
        slot (one per row where nothing is averaged)."""
        return sum(family.part.rows.count * max(1, len(family.averaged)) for family in self.families)

    def _union(self, scales):
        """Each family's rows (int64 numbers, sorted) that any node changed, and their scales
        (the largest of the nodes' row_scales, a vector per averaged slot): one allreduce (max)
        of flag_count() floats."""
        vectors = [vector for family_scales in scales for vector in family_scales]
        largest = iter(tf.split(collectives.maximum(tf.concat(vectors, 0), self.nodes.across),
                                [int(vector.shape[0]) for vector in vectors]))
        changed, gathered = [], []
        for family_scales in scales:
            mine = [next(largest) for _ in family_scales]
            rows = tf.where(tf.reduce_any(tf.stack([vector > 0 for vector in mine]), axis=0))[:, 0]
            changed.append(rows)
            gathered.append([tf.gather(vector, rows) for vector in mine])
        return changed, gathered

    def roll_back(self):
        """Every rank back to the last outer step: its weights, slots and what is alike on every
        node (the step count: a stop between outer steps, whose checkpoint is the last outer
        step's). A collective over the node's ranks."""
        self._settle()
        for piece, then in zip(self.alike, self.alike_then):
            if piece.kind == "json":
                piece.value.load(then)
                continue
            for variable, value in zip(piece.variables, then):
                variable.assign(value)

    def _remember_alike(self):
        self.alike_then = [piece.value.state() if piece.kind == "json" else [v.numpy() for v in piece.variables]
                           for piece in self.alike]
        self.last_step = int(self.state.step)

    def _settle(self):
        """The node's variables take the anchors: a rank's own rows, and the rows its node's
        other ranks own of what every rank of the node holds whole."""
        for family in self.families:
            for target, anchor in zip(family.targets, family.anchors):
                target.assign(collectives.allgather(anchor, self.nodes.node) if family.part.gathered else anchor)

    def inside_bytes(self):
        """Bytes this rank receives from its node's ranks after an outer step (the rows they own
        of what it holds whole), counted from the tensors."""
        return sum(len(family.targets) * (family.part.variable.shape.num_elements() - family.anchors[0].shape
                                          .num_elements()) * family.anchors[0].dtype.size
                   for family in self.families if family.part.gathered)


class OuterExchange(typing.NamedTuple):
    """What one rank's outer step sent between the nodes: its owned rows, how many of them some
    node had changed, and the bytes it sent to be allreduced: the flags of the owned rows, then
    every changed row's delta and averaged slots' increments."""
    rows_changed: int
    rows_owned: int
    across_bytes: int


def row_scales(delta, increments):
    """Per row, for each averaged slot's `increments` (or once, with none), 0 where the row did
    not change (its delta and every slot's increment 0), else the slot's largest increment (the
    smallest float if that is 0): what its increments are divided by in fp16."""
    def per_row(tensor):
        return tf.reduce_max(tf.abs(tf.reshape(tensor, [tensor.shape[0], -1])), axis=1)
    changed = tf.cast(per_row(delta) > 0, tf.float32) * np.finfo(np.float32).tiny
    return [tf.maximum(per_row(increment), changed) for increment in increments] or [changed]


def _slots_by_weight(pieces):
    """{(a weight's ref, travel): its slots of that travel, in the pieces' order}."""
    slots = {}
    for piece in pieces:
        for slot, weight in zip(piece.variables, piece.slot_of):
            slots.setdefault((weight.ref(), piece.travel), []).append(slot)
    return slots
