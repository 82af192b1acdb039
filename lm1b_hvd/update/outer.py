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

import tensorflow as tf

from lm1b_hvd.exchange import collectives
from lm1b_hvd.model import averaging, tables
from lm1b_hvd.model.pieces import Travel
from lm1b_hvd.update.outer_exchange import RESIDUAL_KEY, NodesMean
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
    (exchange.collectives.NodeGroups), with hparams outer_lr, outer_momentum, outer_bits,
    outer_fp16 and ema_decay, on the rows `momentum` (update.outer_parts.OuterMomentum) owns of
    the state's STEPPED pieces; every other piece as its travel says."""

    def __init__(self, state, nodes, hps, momentum, across=None):
        self.state, self.nodes = state, nodes
        self.lr, self.momentum_rate = hps.outer_lr, hps.outer_momentum
        self.ema_decay = hps.ema_decay
        self.momentum = momentum.variables
        slots = _slots_by_weight(state.of(Travel.AVERAGED, Travel.KEPT_PER_NODE))
        self.families, self.kept_pieces = [], []
        for part in momentum.parts:
            averaged, kept = ([slot for slot, _ in slots.get((part.variable.ref(), travel), [])]
                              for travel in (Travel.AVERAGED, Travel.KEPT_PER_NODE))
            anchors = [tf.Variable(owned(target, part.rows), trainable=False)
                       for target in (part.variable, *averaged, *kept)]
            self.families.append(Family(part, averaged, kept, anchors))
            self.kept_pieces.append([piece for _, piece in slots.get((part.variable.ref(), Travel.KEPT_PER_NODE), [])])
        self.followers = [(average, weight) for piece in state.of(Travel.FOLLOWS)
                          for average, weight in zip(piece.variables, piece.slot_of)]
        self.alike = state.of(Travel.ALIKE)
        self.alike_then = []  # the ALIKE pieces' values at the last outer step
        self.last_step = None
        self.mean = NodesMean(momentum.parts, [family.averaged for family in self.families],
                              across or collectives.Across(nodes.across), hps)

    def start(self):
        """Every node takes node 0's weights and averaged slots (after a restore or at the first
        step), and they become the anchors; what each node keeps of its own stays as it is (its
        copy in a checkpoint, or the slots: run.modes). A collective over every rank."""
        root = self.nodes.across.global_ranks[0]
        shared = [(anchor, target) for family in self.families
                  for anchor, target in zip(family.anchors[:1 + len(family.averaged)], family.targets)]
        synced = collectives.broadcast_tensors([owned(target, family.part.rows) for family in self.families
                                                for target in family.targets[:1 + len(family.averaged)]],
                                               root, self.nodes.across)
        for (anchor, _), value in zip(shared, synced):
            anchor.assign(value)
        self.settle()
        self.remember_alike()

    def node_copies(self):
        """This node's copies of what it keeps of its own (its kept slots, as at the last outer
        step, and the quantized exchange's residuals), as NodeCopy records keyed by the
        checkpoint key of what they copy, a logical matrix each."""
        by_key = {}
        for family, pieces in zip(self.families, self.kept_pieces):
            part = family.part
            for piece, anchor, slot in zip(pieces, family.kept_anchors, family.kept):
                key = piece.key if piece.kind == "table" else f"{piece.key}/{part.logical.name}"
                copy = by_key.setdefault(key, NodeCopy(key, part.logical, [], []))
                copy.blocks.append((part.logical_rows, anchor))
                copy.sources.append((slot, part.rows))
        for key, logical, rows, residual in self.mean.residual_copies():
            copy = by_key.setdefault(key, NodeCopy(key, logical, [], []))
            copy.blocks.append((rows, residual))
            copy.sources.append((None, None))
        return list(by_key.values())

    def step(self):
        """The outer step at this step (every rank calls it at the same step); returns what
        crossed between the nodes (an OuterExchange)."""
        step = int(self.state.step)
        # What this node changed since the last outer step; the nodes' mean of the rows any changed.
        deltas = [family.anchors[0] - owned(family.part.variable, family.part.rows) for family in self.families]
        increments = [[owned(slot, family.part.rows) - anchor
                       for slot, anchor in zip(family.averaged, family.averaged_anchors)] for family in self.families]
        changed, mean_deltas, mean_increments, exchange = self.mean.mean(deltas, increments)

        # The outer update, and every node from its result.
        for family, momentum, delta in zip(self.families, self.momentum, mean_deltas):
            momentum.assign(self.momentum_rate * momentum + delta)
            family.anchors[0].assign_sub(self.lr * (delta + self.momentum_rate * momentum))
        for family, rows, slot_increments in zip(self.families, changed, mean_increments):
            for anchor, increment in zip(family.averaged_anchors, slot_increments):
                anchor.scatter_nd_add(rows[:, None], increment)
            for anchor, slot in zip(family.kept_anchors, family.kept):
                anchor.assign(owned(slot, family.part.rows))
        self.settle()
        averaging.move_towards(self.followers, self.ema_decay, steps=step - self.last_step)
        self.remember_alike()
        return exchange

    def roll_back(self):
        """Every rank back to the last outer step: its weights, slots and what is alike on every
        node (the step count: a stop between outer steps, whose checkpoint is the last outer
        step's). A collective over the node's ranks."""
        self.settle()
        for piece, then in zip(self.alike, self.alike_then):
            if piece.kind == "json":
                piece.value.load(then)
                continue
            for variable, value in zip(piece.variables, then):
                variable.assign(value)

    def remember_alike(self):
        self.alike_then = [piece.value.state() if piece.kind == "json" else [v.numpy() for v in piece.variables]
                           for piece in self.alike]
        self.last_step = int(self.state.step)

    def settle(self, weights=None):
        """The node's variables take the anchors (the weights `weights`, one a family, when
        given): a rank's own rows, and the rows its node's other ranks own of what every rank
        of the node holds whole."""
        for index, family in enumerate(self.families):
            sources = family.anchors if weights is None else [weights[index], *family.anchors[1:]]
            for target, source in zip(family.targets, sources):
                target.assign(collectives.allgather(source, self.nodes.node) if family.part.gathered else source)

    def inside_bytes(self):
        """Bytes this rank receives from its node's ranks after an outer step (the rows they own
        of what it holds whole), counted from the tensors."""
        return sum(len(family.targets) * (family.part.variable.shape.num_elements() - family.anchors[0].shape
                                          .num_elements()) * family.anchors[0].dtype.size
                   for family in self.families if family.part.gathered)


class NodeCopy(typing.NamedTuple):
    """A node's copy of something it keeps of its own: this rank's rows of it (`blocks`,
    (logical rows, variable)) in the logical matrix shaped as `logical`, under `key`; `sources`,
    what each variable copies ((slot, owned rows): a kept slot's anchor), or (None, None): a
    residual of the quantized exchange."""
    key: str
    logical: tables.VocabTable
    blocks: list
    sources: list

    def table(self, name):
        """The copy as a logical matrix of the rows this rank owns, for a checkpoint."""
        return tables.VocabTable(name, self.logical.vocab_size, self.logical.width, self.blocks)

    @property
    def is_residual(self):
        return self.key.startswith(RESIDUAL_KEY)

    def reset(self):
        """What a node takes when the checkpoint held no copy of its own: a kept slot, the
        slot's values as restored (node 0's); a residual, zero."""
        for (_, variable), (slot, rows) in zip(self.blocks, self.sources):
            variable.assign(owned(slot, rows) if slot is not None else tf.zeros_like(variable))


def _slots_by_weight(pieces):
    """{(a weight's ref, travel): its slots of that travel and their pieces, in the pieces' order}."""
    slots = {}
    for piece in pieces:
        for slot, weight in zip(piece.variables, piece.slot_of):
            slots.setdefault((weight.ref(), piece.travel), []).append((slot, piece))
    return slots
