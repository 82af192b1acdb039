"""How the ranks of a run keep together: the sync mode, chosen once from the hparams and the
nodes (`choose`).

- `Synchronous`: every step's gradients are exchanged over every rank; rank 0's state is
  broadcast after the first step. Every point between two steps is settled.
- `TwoLevel` (hparam outer_every=H on more than one node): every step inside a node, an outer
  step between the nodes every H steps (update.outer); the nodes start from rank 0's state, and
  only the points of outer steps are settled: evaluations, checkpoints and the end of a run wait
  for them, and a run stopped between them goes back to the last.

A mode owns what differs between them: the ranks a step exchanges between, the pieces of state
it keeps beyond the synchronous ones, the start, what follows each step and whether the point is
settled, the roll-back of a stop, the start line, which checkpoint parts each rank writes, and
its share of the bench's figures. The loop (run.loop), the bench and the checkpoints ask the
mode, never the hparams.
"""
import dataclasses
import statistics
import time
import typing

from lm1b_hvd.exchange.mpi_across import MpiAcross
from lm1b_hvd.model.pieces import NODE_COPIES, Piece, Travel
from lm1b_hvd.run.checkpoints import CheckpointParts
from lm1b_hvd.run.state import TrainingState
from lm1b_hvd.update.eager_outer import OVERLAP_KEYS, EagerOuterStep
from lm1b_hvd.update.outer import OuterStep
from lm1b_hvd.update.outer_exchange import RESIDUAL_KEY
from lm1b_hvd.update.outer_parts import OuterMomentum, owned_parts


def may_span_nodes(hps):
    """Whether a run of these hparams asks for nodes (outer steps), so that Horovod must be able
    to make process sets for them."""
    return bool(hps.outer_every)


def choose(hps, ranks, nodes=None):
    """The sync mode of a run: two-level when `nodes` (exchange.collectives.NodeGroups, made for
    a run that may_span_nodes) has more than one node, else synchronous (on one node, saying so)."""
    if nodes is not None and nodes.count > 1:
        return TwoLevel(hps, ranks, nodes)
    note = None
    if may_span_nodes(hps):
        note = (f"outer_every={hps.outer_every}: all {ranks.size} rank(s) are on one node, nothing to average between "
                "nodes: every step is synchronous")
    return Synchronous(hps, ranks, note)


class NodeLayout(typing.NamedTuple):
    """The nodes of a two-level run and what each keeps of its own (the keys of its kept slots),
    as the record beside the run position holds them; `count` 0: a synchronous run."""
    count: int = 0
    ranks_per_node: int = 0
    kept: tuple = ()

    def state(self):
        if not self.count:
            return None
        return {"nodes": self.count, "ranks_per_node": self.ranks_per_node, "kept_per_node": list(self.kept)}

    @classmethod
    def of(cls, saved):
        """The layout of a saved record (a list [nodes, ranks per node] before nodes kept state)."""
        if not saved:
            return cls()
        if isinstance(saved, list):
            return cls(*saved)
        return cls(saved["nodes"], saved["ranks_per_node"], tuple(saved.get("kept_per_node", ())))

    def load(self, saved):
        """The line that says what a restore did with the checkpoint's outer state ('' when the
        run's nodes are the checkpoint's, or neither is two-level)."""
        then, now = NodeLayout.of(saved), self
        if then == now:
            return ""
        if not now.count:
            said = (f"the checkpoint's run was two-level ({then.count} nodes x {then.ranks_per_node} ranks): its "
                    "outer momentum is not used")
        elif not then.count:
            said = "the checkpoint's run was synchronous: the outer momentum starts at zero"
        elif (then.count, then.ranks_per_node) != (now.count, now.ranks_per_node):
            said = (f"the checkpoint's run had {then.count} nodes x {then.ranks_per_node} ranks, this one "
                    f"{now.count} x {now.ranks_per_node}: each rank reads the outer momentum of the rows it owns now")
        else:
            said = ""
        return "; ".join(line for line in (said, self._kept_slots(then)) if line)

    def _kept_slots(self, then):
        """What became of what the checkpoint's nodes kept of their own, or this run's nodes keep."""
        said, same_nodes = [], then.count == self.count
        kept_then, kept_now = then.kept_kinds(), self.kept_kinds()
        if {"slots"} <= kept_then & kept_now and same_nodes:
            said.append("each node reads its own Adagrad accumulators")
        elif "slots" in kept_then:
            said.append(f"the checkpoint's {then.count} nodes kept their own Adagrad accumulators: this run starts "
                        "from node 0's")
        elif "slots" in kept_now:
            said.append("every node starts from the checkpoint's Adagrad accumulators and keeps its own from here")
        if {"residuals"} <= kept_then & kept_now and same_nodes:
            said.append("each node reads its own residuals of the quantized exchange")
        elif "residuals" in kept_now:
            said.append("the residuals of the quantized exchange start at zero")
        if {"overlap"} <= kept_then & kept_now and same_nodes:
            said.append("each node goes on from its own start of the overlapped exchange")
        elif "overlap" in kept_now:
            said.append("the overlapped exchange starts afresh from the checkpoint's weights")
        return "; ".join(said)

    def kept_kinds(self):
        """What the nodes keep of their own: a set of 'slots', 'residuals', 'overlap'."""
        def kind(key):
            if key.startswith(RESIDUAL_KEY):
                return "residuals"
            return "overlap" if key.startswith(OVERLAP_KEYS) else "slots"
        return {kind(key) for key in self.kept}


class SyncMode:
    """What every sync mode answers, with the answers they share."""
    period = 1  # steps from one settled point to the next
    averages_each_step = True  # the trainer moves the EMA after each step
    step_exchange_where = ""  # what the bench says of where a step's exchange runs: between every rank

    def __init__(self, hps, ranks):
        self.hps, self.ranks = hps, ranks
        self.stepping = ranks  # the ranks a step's gradients travel between
        self.state = None

    def training_state(self, model):
        """The TrainingState of `model` with this mode's pieces; the mode keeps it."""
        raise NotImplementedError

    def start(self):
        """Before the first step (after any restore)."""

    def after_step(self, step, first):
        """After step `step` (`first`: this process's first): whether the point it reached is
        settled (every rank may evaluate, checkpoint or stop here)."""
        raise NotImplementedError

    def roll_back(self, point, settled):
        """(the point to save at a stop at `point`, and a line that says what was done, or
        None); `settled`, the last settled point."""
        return point, None

    def describe(self, max_steps=0):
        """The start line that says how the ranks keep together, or None."""
        return None

    def checkpoint_parts(self):
        """Who writes parts of the tables before a checkpoint is merged (CheckpointParts)."""
        raise NotImplementedError

    def start_timing(self):
        """The bench times from here."""

    def finish(self):
        """After the bench's steps: what is still travelling arrives."""

    def timeline(self, origin):
        """What the mode did beside the steps since start_timing, for the bench's --steps_timeline."""
        return {}

    def seconds_beside_steps(self, step_times):
        """What this mode spent beside the steps since start_timing, whose times are `step_times`
        (what it slowed them down by included)."""
        return 0.0

    def bench_lines(self, step_times, step_seconds):
        """The bench's figures of what this mode did beside the steps since start_timing, whose
        times are `step_times` (a collective); `step_seconds`, a step's time with it."""
        return []


class Synchronous(SyncMode):
    """Every step over every rank (`ranks`); `note`, what the start line says of it (or None)."""

    def __init__(self, hps, ranks, note=None):
        super().__init__(hps, ranks)
        self.note = note

    def training_state(self, model):
        self.state = TrainingState(model)
        # The run's nodes: none (a two-level checkpoint's momentum is not used, and the restore says so).
        self.state.add([Piece("run_position/nodes", "json", NodeLayout(), [], travel=Travel.OUTER)])
        return self.state

    def after_step(self, step, first):
        """Rank 0's state to every rank after this process's first step, which makes what Keras
        builds lazily (the optimizer's slots); every point is settled."""
        if first:
            self.state.broadcast_from_root(self.ranks)
        return True

    def describe(self, max_steps=0):
        return self.note

    def checkpoint_parts(self):
        """Vocabulary-parallel, every rank writes the rows it holds; else rank 0 writes all."""
        if self.state.model.vocab_parallel:
            return CheckpointParts(self.ranks.size, self.ranks.rank)
        return CheckpointParts()


class ExchangeRecord:
    """Whether the mean of an overlapped run's last exchange had arrived when its checkpoint was
    taken (a checkpoint waits for it), as a record beside the run position."""

    def __init__(self, outer):
        self.outer = outer

    def state(self):
        return {"mean_arrived": self.outer.mean_arrived}

    def load(self, saved):
        self.outer.mean_arrived = bool(saved and saved.get("mean_arrived"))


class OuterTiming(typing.NamedTuple):
    """An outer step: what crossed between the nodes (update.outer_exchange.OuterExchange; with
    outer_overlap, the exchange of the period before, if one), when it started and ended
    (time.perf_counter), and whether an exchange was travelling when it ended."""
    exchange: object
    started: float
    ended: float

    @property
    def seconds(self):
        return self.ended - self.started


class TwoLevel(SyncMode):
    """Synchronous inside each node of `nodes` (exchange.collectives.NodeGroups), an outer step
    between the nodes every hparam outer_every steps."""
    averages_each_step = False  # the averages move at outer steps (update.outer)
    step_exchange_where = "inside a node, "

    def __init__(self, hps, ranks, nodes):
        super().__init__(hps, ranks)
        self.nodes, self.period = nodes, hps.outer_every
        self.stepping = nodes.node
        self.outer, self.copies, self.overlap_tables = None, [], []
        self.copies_read, self.shared_read = set(), set()  # what a restore read of the node's own, and of the overlap's
        self.timings = None  # the outer steps since start_timing: the bench's, none in a run

    def training_state(self, model):
        hps, nodes = self.hps, self.nodes
        state = TrainingState(model)
        if hps.outer_slots == "local":  # each node goes on with its own Adagrad accumulators
            state.pieces = [dataclasses.replace(piece, travel=Travel.KEPT_PER_NODE)
                            if piece.travel is Travel.AVERAGED else piece for piece in state.pieces]
        # The outer momentum of the rows each rank owns at outer steps (missing, a synchronous
        # run's checkpoint: none yet).
        momentum = OuterMomentum(owned_parts(state.of(Travel.STEPPED), nodes.node))
        state.add([Piece(key, "table", table, table.variables, shared=False, if_missing=momentum.zero,
                         travel=Travel.OUTER) for key, table in momentum.named()])
        if hps.outer_overlap:  # the outer step's exchange beside the next period, on a communicator of its own
            self.outer = EagerOuterStep(state, nodes, hps, momentum, MpiAcross(nodes.node.rank, nodes.index))
            self.overlap_tables = self.outer.shared_tables()
            state.add([Piece(key, "table", table, table.variables, shared=False, travel=Travel.OUTER,
                             restore=self._restore_shared(key, table)) for key, table in self.overlap_tables])
            state.add([Piece("run_position/outer_exchange", "json", ExchangeRecord(self.outer), [],
                             travel=Travel.OUTER)])
            state.before_saving.append(self.outer.wait_for_exchange)
        else:
            self.outer = OuterStep(state, nodes, hps, momentum)
        self.state = state
        # The residuals of what each node averages for the others (bits below 16), each node its
        # range of rows; this node's copies of what it keeps of its own; the nodes.
        state.add([Piece(key, "table", table, table.variables, shared=False, if_missing=self.outer.mean.zero_received,
                         travel=Travel.OUTER) for key, table in self.outer.mean.received_residuals_named()])
        self.copies = self.outer.node_copies()
        state.add([Piece(f"{NODE_COPIES}{nodes.index}/{copy.key}", "table", table, table.variables, shared=False,
                         travel=Travel.KEPT_PER_NODE, restore=self._restore_copy(copy, table))
                   for copy in self.copies for table in [copy.table(f"node_{copy.logical.name}")]])
        layout = NodeLayout(nodes.count, nodes.node.size, tuple(copy.key for copy in self.copies))
        state.add([Piece("run_position/nodes", "json", layout, [], travel=Travel.OUTER)])
        return state

    def _restore_copy(self, copy, table):
        """A restore of this node's copy: its own when the checkpoint's run had as many nodes and
        kept it, else what the node takes without one (NodeCopy.reset)."""
        def restore(path, saved):
            key = f"{NODE_COPIES}{self.nodes.index}/{copy.key}"
            saved_nodes = {name.split("/")[1] for name in saved if name.startswith(NODE_COPIES)}
            if len(saved_nodes) == self.nodes.count and key in saved:
                table.restore(path, key)
                self.copies_read.add(copy.key)
            else:
                copy.reset()
        return restore

    def _restore_shared(self, key, table):
        """A restore of what every node of an overlapped run holds alike, when the checkpoint has it."""
        def restore(path, saved):
            if key in saved:
                table.restore(path, key)
                self.shared_read.add(key)
        return restore

    def start(self):
        """Every node starts from rank 0's state (before the first step, since the nodes differ
        after it), and that is the first anchor of the outer steps; what a node keeps of its own
        starts from its copy in the checkpoint, if it had one."""
        self.state.broadcast_from_root(self.ranks)
        if not self.copies_read:
            for copy in self.copies:
                copy.reset()
        if self.hps.outer_overlap:
            self.outer.restored = (self.copies_read == {copy.key for copy in self.copies}
                                   and self.shared_read == {key for key, _ in self.overlap_tables})
        self.outer.start()

    def after_step(self, step, first):
        if step % self.period == 0:
            started = time.perf_counter()
            exchange = self.outer.step()
            if self.timings is not None:
                self.timings.append(OuterTiming(exchange, started, time.perf_counter()))
        if self.timings is not None:
            self.travelling.append(self._travelling())
        return self.outer.last_step == step

    def _travelling(self):
        """Whether an outer exchange is travelling now (beside the steps, with outer_overlap)."""
        return self.hps.outer_overlap and self.outer.exchange_in_flight()

    def roll_back(self, point, settled):
        self.outer.roll_back()
        return settled, (f"stopped at step {point.step}, between outer steps: the checkpoint is the last outer step's, "
                         f"step {settled.step} (a resume repeats steps {settled.step + 1}-{point.step})")

    def describe(self, max_steps=0):
        hps, nodes = self.hps, self.nodes
        sent_in = self.sent_in()
        slots = "kept per node" if hps.outer_slots == "local" else "averaged"
        line = (f"two-level: {nodes.count} nodes x {nodes.node.size} rank(s); every step inside a node, an outer "
                f"step between nodes every {self.period} steps (outer_lr {hps.outer_lr}, Nesterov "
                f"outer_momentum {hps.outer_momentum}; the changed rows sent in {sent_in}"
                f"{', beside the next period' if hps.outer_overlap else ''}; Adagrad's accumulators {slots}); "
                "evaluations and checkpoints at outer steps")
        if max_steps % self.period:
            line += f"; --max_steps {max_steps} ends with step {max_steps - max_steps % self.period}'s outer step"
        return line

    def sent_in(self):
        """How the changed rows' deltas travel between nodes (hparams outer_bits, outer_fp16)."""
        if self.hps.outer_bits < 16:
            return f"{self.hps.outer_bits} bits with error feedback"
        return "fp16" if self.hps.outer_fp16 else "fp32"

    def checkpoint_parts(self):
        """At an outer step every node holds the same state but what it keeps of its own: the
        ranks of the first node write the parts, each the momentum of its own rows (and,
        vocabulary-parallel, its tables' rows); with kept slots, every node's ranks write their
        node's copies too."""
        node, index = self.nodes.node, self.nodes.index
        if not self.copies:
            return CheckpointParts(node.size, node.rank if index == 0 else None)

        def writes(piece):  # the first node as without copies; every node its copies and its received residuals
            if piece.key.startswith((NODE_COPIES, f"{RESIDUAL_KEY}/received/")):
                return True
            return index == 0 and (node.rank == 0 or not piece.shared)
        return CheckpointParts(self.nodes.count * node.size, index * node.size + node.rank, writes)

    def start_timing(self):
        self.timings, self.travelling, self.timing_origin = [], [self._travelling()], time.perf_counter()

    def finish(self):
        if self.hps.outer_overlap:
            self.outer.wait_for_exchange()

    def seconds_beside_steps(self, step_times):
        # An overlapped exchange is not free: the steps it travels beside take longer (on the
        # CPU its thread and the MPI progress share the cores), and the bench's median would hide that.
        beside, alone = self._steps_beside_exchanges(step_times)
        usual = statistics.median(alone) if alone else 0.0
        slowed = sum(max(0.0, seconds - usual) for seconds in beside) if alone else 0.0
        return sum(timing.seconds for timing in self.timings) + slowed

    def timeline(self, origin):
        """The outer steps and the overlapped exchanges since start_timing, as [start, end]
        seconds from `origin` (time.perf_counter), for the bench's --steps_timeline."""
        exchanges = self.timed_exchanges() if self.hps.outer_overlap else []
        return {"outer_steps": [[timing.started - origin, timing.ended - origin] for timing in self.timings],
                "exchanges": [[sent - origin, arrived - origin] for _, sent, arrived in exchanges]}

    def bench_lines(self, step_times, step_seconds):
        ranks, every, timed_steps = self.ranks, self.period, len(step_times)
        lines = self._overlap_lines(step_times) if self.hps.outer_overlap else []
        exchanges = [timing.exchange for timing in self.timings if timing.exchange is not None]
        if self.hps.outer_overlap:
            exchanges = [exchange for exchange, _, _ in self.timed_exchanges()]
        across = ranks.gather_numbers([statistics.mean(e.across_bytes for e in exchanges) / every])
        inside = ranks.gather_numbers([self.outer.inside_bytes() / every])
        changed = ranks.gather_numbers([sum(e.rows_changed for e in exchanges), sum(e.rows_owned for e in exchanges)])
        return [
            f"outer steps: {len(self.timings)} in the {timed_steps} timed steps (one every {every}), median "
            f"{statistics.median(timing.seconds for timing in self.timings) * 1e3:,.1f} ms each; with them, "
            f"{step_seconds * 1e3:,.1f} ms a step",
            f"between nodes, outer {'allreduce' if self.hps.outer_bits == 16 else 'alltoall and allgather'}: sent "
            f"{statistics.mean(across) / 1e6:,.3f} MB, received "
            f"{statistics.mean(across) / 1e6:,.3f} MB per rank per step (each outer step's / {every}; "
            f"{100 * sum(changed[0::2]) / sum(changed[1::2]):.0f}% of the rows changed, {self.sent_in()})",
            f"inside a node after an outer step, allgather: received {statistics.mean(inside) / 1e6:,.3f} MB per "
            f"rank per step (each outer step's / {every})",
        ] + lines

    def _overlap_lines(self, step_times):
        """How long the overlapped exchanges travelled, and the steps' time while one did and
        while none did (an exchange in flight when a step started counts it as beside one)."""
        travelled = [arrived - sent for _, sent, arrived in self.timed_exchanges()]
        beside, alone = self._steps_beside_exchanges(step_times)

        def median_ms(values):
            return f"{statistics.median(values) * 1e3:,.1f} ms" if values else "-"
        return [f"outer exchanges beside the steps: {len(travelled)}, median {median_ms(travelled)} from send to "
                f"arrival; steps while one travelled: median {median_ms(beside)} over {len(beside)}; while none "
                f"did: median {median_ms(alone)} over {len(alone)}"]

    def _steps_beside_exchanges(self, step_times):
        """The times of the steps that started while an overlapped exchange travelled, and of the others."""
        flags = self.travelling if self.hps.outer_overlap else [False] * len(step_times)
        return ([seconds for seconds, flag in zip(step_times, flags) if flag],
                [seconds for seconds, flag in zip(step_times, flags) if not flag])

    def timed_exchanges(self):
        """The overlapped exchanges sent since start_timing: (OuterExchange, sent, arrived)."""
        return [entry for entry in self.outer.exchanges if entry[1] >= self.timing_origin]
