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
its 1/K of the rows, which the node then gathers. A node's link carries one copy of the
parameters' deltas and accumulators per outer step, shared among its ranks. The outer state
(the anchors A, the accumulators at A, the momentum) is kept for the owned rows only.
"""
import tensorflow as tf

from lm1b_hvd.exchange import collectives
from lm1b_hvd.update.outer_parts import owned


class OuterStep:
    """The outer steps of a run.state.TrainingState between the nodes of `nodes`
    (exchange.ranks.NodeGroups), with hparams outer_lr and outer_momentum."""

    def __init__(self, state, nodes, hps):
        self.state, self.nodes = state, nodes
        self.lr, self.momentum_rate = hps.outer_lr, hps.outer_momentum
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
        """The outer step at this step (every rank calls it at the same step)."""
        step = int(self.state.step)
        deltas = [anchor - owned(part.variable, part.rows) for part, anchor in zip(self.parts, self.anchors)]
        owned_accumulators = [owned(accumulator, part.rows) for part, accumulator in zip(self.parts, self.accumulators)]
        averaged = collectives.average_dense(deltas + owned_accumulators, ranks=self.nodes.across)
        mean_deltas, mean_accumulators = averaged[:len(deltas)], averaged[len(deltas):]
        for anchor, momentum, delta in zip(self.anchors, self.momentum, mean_deltas):
            momentum.assign(self.momentum_rate * momentum + delta)
            anchor.assign_sub(self.lr * (delta + self.momentum_rate * momentum))
        for anchor, accumulator in zip(self.anchor_accumulators, mean_accumulators):
            anchor.assign(accumulator)
        self._settle()
        self.state.ema.update(steps=step - self.last_step)
        self.last_step = step

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

    def bytes_per_outer_step(self):
        """(across, inside): bytes this rank sends over the nodes' link at an outer step (its
        owned rows' deltas and accumulators, allreduced), and receives from its node's ranks
        (the rows they own of what it holds whole), counted from the tensors."""
        across = sum(2 * anchor.shape.num_elements() * anchor.dtype.size for anchor in self.anchors)
        inside = sum(2 * (part.variable.shape.num_elements() - anchor.shape.num_elements()) * anchor.dtype.size
                     for part, anchor in zip(self.parts, self.anchors) if part.gathered)
        return across, inside
