"""The outer step with its exchange overlapped with the next period (hparam outer_overlap): eager
updates (Kale, Douillard and Donchev 2025), in this form.

Every node holds the same anchor A, the weights the nodes agree on, and the outer momentum M;
they move by the nodes' mean change g of each period, one period late, as the outer step of
update.outer would move them. Node n starts each period from S_n and ends it at theta_n; what
it changed, d_n = S_n - theta_n, travels while the next period trains. At the outer step that
ends period t, node n:

    waits for g(t-1), the mean of the d(t-1), which travelled during period t;
    M = outer_momentum * M + g(t-1);  A = A - outer_lr * (g(t-1) + outer_momentum * M)
    sends d_n(t) for the mean g(t), in the background (an MPI communicator of its own:
        exchange.mpi_across), and goes on at once from
    S_n = A - outer_lr * (e + outer_momentum * (outer_momentum * M + e)),
        e = g(t-1) + (d_n(t) - d_n(t-1)) / N     (its own fresh change in place of its stale one)

So S_n is the outer step A would take with the mean estimated from this node's fresh change and
the others' of the period before; when g(t) arrives, A takes the true one. At the first outer
step there is no mean yet (g = 0, d(0) = 0). The averages (EMA) follow A, so that every node
holds the same averages, which evaluation and inference read (hence average_params). Adagrad's
accumulators stay with each node (outer_slots=local): nothing of them would arrive in time.

What a node holds of its own: S_n and d_n(t) (its copies in a checkpoint, beside its slots and
residuals); what every node holds alike: A, M, g(t-1) and, once a checkpoint or a stop has
waited for it, g(t). A stop between outer steps goes back to the last outer step, with its
exchange still to finish; a checkpoint waits for the exchange in flight, so that a resume finds
its mean in the checkpoint and goes on exactly.
"""
import concurrent.futures
import time

import tensorflow as tf

from lm1b_hvd.model import averaging, tables
from lm1b_hvd.update.outer import NodeCopy, OuterStep
from lm1b_hvd.update.outer_exchange import weight_name
from lm1b_hvd.update.outer_parts import owned


OVERLAP_KEYS = ("outer_start/", "outer_delta/")  # a node's own start and change, in its copy in a checkpoint


class EagerOuterStep(OuterStep):
    """OuterStep with its exchange overlapped (module docstring); `across`, the exchange's
    collectives on a communicator of their own (exchange.mpi_across.MpiAcross)."""

    def __init__(self, state, nodes, hps, momentum, across):
        super().__init__(state, nodes, hps, momentum, across)
        self.period = hps.outer_every
        anchors = [family.anchors[0] for family in self.families]
        self.starts = [tf.Variable(anchor, trainable=False) for anchor in anchors]  # S_n
        self.own_deltas = [tf.Variable(tf.zeros_like(anchor), trainable=False) for anchor in anchors]  # d_n(t)
        self.last_means = [tf.Variable(tf.zeros_like(anchor), trainable=False) for anchor in anchors]  # g(t-1)
        self.arrived_means = [tf.Variable(tf.zeros_like(anchor), trainable=False) for anchor in anchors]  # g(t)
        self.in_flight = None  # the exchange sent at the last outer step, while it travels (a Future)
        self.mean_arrived = False  # whether arrived_means holds a mean the anchor has yet to take
        self.restored = False  # whether a checkpoint gave this node its overlapped state (run.modes)
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="outer-exchange")
        self.exchanges = []  # (OuterExchange, when it was sent, when it arrived: time.perf_counter), as they arrive

    def start(self):
        """Every node takes node 0's weights as the anchor and as its start, unless a checkpoint
        gave it its overlapped state; then each node goes on from its own start."""
        if not self.restored:
            super().start()
            for start, own, last, family in zip(self.starts, self.own_deltas, self.last_means, self.families):
                start.assign(family.anchors[0])
                own.assign(tf.zeros_like(own))
                last.assign(tf.zeros_like(last))
            self.mean_arrived = False
        self.in_flight = None
        self.settle(self.starts)
        self.remember_alike()

    def step(self):
        """The outer step ending this period (every rank calls it at the same step): the mean of
        the period before applied to the anchor, this period's change sent, and the next period
        started at once. Returns the OuterExchange of the period before's exchange (None at the
        first outer step)."""
        deltas = [start - owned(family.part.variable, family.part.rows)
                  for start, family in zip(self.starts, self.families)]
        arrived = self.wait_for_exchange()
        if self.mean_arrived:
            self._advance(self.arrived_means, steps=self.period)
            for last, mean in zip(self.last_means, self.arrived_means):
                last.assign(mean)
            self.mean_arrived = False
        self.in_flight = self.executor.submit(self._exchange, deltas, time.perf_counter())
        nodes = self.nodes.count
        for family, start, own, last, delta, momentum in zip(self.families, self.starts, self.own_deltas,
                                                              self.last_means, deltas, self.momentum):
            estimate = last + (delta - own) / nodes
            start.assign(family.anchors[0] - self.lr * (estimate + self.momentum_rate *
                                                        (self.momentum_rate * momentum + estimate)))
            own.assign(delta)
            for anchor, slot in zip(family.kept_anchors, family.kept):
                anchor.assign(owned(slot, family.part.rows))
        self.settle(self.starts)
        self.remember_alike()
        return arrived

    def _exchange(self, deltas, sent):
        """In the background: the nodes' mean of `deltas` (no slot travels)."""
        _, means, _, exchange = self.mean.mean(deltas, [[] for _ in deltas])
        return means, exchange, sent, time.perf_counter()

    def wait_for_exchange(self):
        """The exchange in flight finishes, if one is: its mean is kept for the anchor to take
        (and for a checkpoint, which calls this first). Returns its OuterExchange, or None."""
        if self.in_flight is None:
            return None
        means, exchange, sent, arrived_at = self.in_flight.result()
        for arrived, mean in zip(self.arrived_means, means):
            arrived.assign(mean)
        self.exchanges.append((exchange, sent, arrived_at))
        self.in_flight, self.mean_arrived = None, True
        return exchange

    def exchange_in_flight(self):
        """Whether an exchange is travelling now (the bench's)."""
        return self.in_flight is not None and not self.in_flight.done()

    def _advance(self, means, steps):
        """The anchor and the momentum by the nodes' mean change, as the outer step would; the
        averages follow the anchor (the node's weights hold it while they move)."""
        for family, momentum, mean in zip(self.families, self.momentum, means):
            momentum.assign(self.momentum_rate * momentum + mean)
            family.anchors[0].assign_sub(self.lr * (mean + self.momentum_rate * momentum))
        self.settle()
        averaging.move_towards(self.followers, self.ema_decay, steps=steps)

    def roll_back(self):
        """Back to the last outer step: the node's start, its slots and what is alike; the
        exchange sent then is still the one in flight."""
        super().roll_back()
        self.settle(self.starts)

    def shared_tables(self):
        """(key, VocabTable) of what every node holds alike: the anchor, g(t-1), and g(t) once it
        arrived, each rank its owned rows (written by the first node's ranks)."""
        named = []
        for name, variables in (("outer_anchor", [family.anchors[0] for family in self.families]),
                                ("outer_mean/last", self.last_means), ("outer_mean/arrived", self.arrived_means)):
            by_key = {}
            for family, variable in zip(self.families, variables):
                part = family.part
                by_key.setdefault(f"{name}/{weight_name(part)}", (part.logical, []))[1].append(
                    (part.logical_rows, variable))
            named += [(key, tables.VocabTable(f"{logical.name}_{name.replace('/', '_')}", logical.vocab_size,
                                              logical.width, blocks)) for key, (logical, blocks) in by_key.items()]
        return named

    def node_copies(self):
        """OuterStep's, and the node's start (reset: the anchor) and own change (reset: 0)."""
        copies = super().node_copies()
        for name, variables, from_anchor in ((OVERLAP_KEYS[0][:-1], self.starts, True),
                                             (OVERLAP_KEYS[1][:-1], self.own_deltas, False)):
            by_key = {}
            for family, variable in zip(self.families, variables):
                part = family.part
                key = f"{name}/{weight_name(part)}"
                copy = by_key.setdefault(key, NodeCopy(key, part.logical, [], []))
                copy.blocks.append((part.logical_rows, variable))
                copy.sources.append((family.anchors[0], tables.Rows(0, variable.shape[0])) if from_anchor
                                    else (None, None))
            copies += list(by_key.values())
        return copies
