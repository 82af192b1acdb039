"""The training stack, built one way for a run (run.loop) and for the bench: the ranks, the
nodes, the sync mode (run.modes), the model, its training state and its trainer; and the one
table of the combinations a run refuses, each with its one-line reason, checked before anything
is built or written.
"""
import typing

from lm1b_hvd import console
from lm1b_hvd.exchange import collectives, mpi_across
from lm1b_hvd.exchange.vocab_parallel import vocab_exchange
from lm1b_hvd.model.language_model import LSTMPLanguageModel
from lm1b_hvd.run import modes
from lm1b_hvd.update.step import Trainer


class Launch(typing.NamedTuple):
    """What a command asks of the ranks beside the hparams: `ranks_per_node` K, ranks 0..K-1,
    K..2K-1, ... form the nodes (0: the hosts); `elastic`, Horovod's elastic mode; `exchange`
    False, no gradient exchange at all (the bench's baseline)."""
    ranks_per_node: int = 0
    elastic: bool = False
    exchange: bool = True


class Combination(typing.NamedTuple):
    """What the refusals look at: the hparams, the launch, how many nodes the ranks are on (1
    when the hparams ask for no outer steps), and why MPI cannot carry a second exchange beside
    Horovod's here ('' when it can)."""
    hps: object
    launch: Launch
    nodes: int = 1
    no_mpi_beside: str = ""


class Refusal(typing.NamedTuple):
    """A combination a run refuses (`refused(Combination)`), why (`reason`, formatted with the
    hparams' fields), and one that it refuses (`example`: an hpconfig, the Launch's fields and
    `nodes`), which tests/test_stack.py checks."""
    refused: typing.Callable
    reason: str
    example: dict


REFUSALS = (
    Refusal(lambda c: c.launch.elastic and c.hps.vocab_parallel,
            "--elastic cannot be used with vocab_parallel=true: an elastic reset would have to re-shard the "
            "vocabulary's rows over the new ranks, which this trainer does not do; drop one of the two",
            dict(hpconfig="vocab_parallel=true", elastic=True)),
    Refusal(lambda c: c.launch.elastic and c.hps.outer_every,
            "--elastic cannot be used with outer_every={outer_every}: an elastic reset would have to re-form the "
            "nodes and their outer state, which this trainer does not do; drop one of the two",
            dict(hpconfig="outer_every=4", elastic=True)),
    Refusal(lambda c: c.nodes > 1 and c.hps.precision == "fp16",
            "outer_every={outer_every} cannot be used with precision=fp16: each node's loss scale would drift from "
            "the others'; use precision=bf16 or fp32",
            dict(hpconfig="outer_every=4,precision=fp16", nodes=2)),
    Refusal(lambda c: not c.hps.outer_every and c.hps.outer_slots != "averaged",
            "hparam 'outer_slots={outer_slots}' needs outer_every: there are no outer steps to keep them through; set "
            "outer_every or drop it",
            dict(hpconfig="outer_slots=local")),
    Refusal(lambda c: not c.hps.outer_every and c.hps.outer_bits != 16,
            "hparam 'outer_bits={outer_bits}' needs outer_every: only outer steps are sent in fewer bits; set "
            "outer_every or drop it",
            dict(hpconfig="outer_bits=8")),
    Refusal(lambda c: not c.hps.outer_every and c.hps.outer_overlap,
            "hparam 'outer_overlap' needs outer_every: there is no outer exchange to overlap; set outer_every or "
            "drop it",
            dict(hpconfig="outer_overlap=true")),
    Refusal(lambda c: c.hps.outer_overlap and c.hps.outer_slots != "local",
            "hparam 'outer_overlap' needs outer_slots=local: averaged Adagrad accumulators would arrive a period "
            "late; keep them per node",
            dict(hpconfig="outer_every=4,outer_overlap=true")),
    Refusal(lambda c: c.hps.outer_overlap and not c.hps.average_params,
            "hparam 'outer_overlap' needs average_params=true: between outer steps the nodes' weights differ, "
            "and only their averages are one model to evaluate",
            dict(hpconfig="outer_every=4,outer_slots=local,outer_overlap=true,average_params=false")),
    Refusal(lambda c: c.hps.outer_overlap and c.nodes > 1 and c.no_mpi_beside,
            "hparam 'outer_overlap' needs a launch through MPI (horovodrun --mpi, mpirun, or srun --mpi=pmix): its "
            "exchange runs on an MPI communicator of its own beside Horovod's collectives, which run on one thread; "
            "launch so, or drop outer_overlap",
            dict(hpconfig="outer_every=4,outer_slots=local,outer_overlap=true", nodes=2,
                 no_mpi_beside="a Gloo launch")),
    Refusal(lambda c: c.hps.vocab_parallel and c.hps.sparse_as_dense,
            "hparam 'vocab_parallel' cannot be combined with sparse_as_dense=true: the vocabulary's rows and their "
            "gradients travel between their owners, outside any compiled part",
            dict(hpconfig="vocab_parallel=true,sparse_as_dense=true")),
    Refusal(lambda c: c.hps.vocab_parallel and c.hps.xla and c.hps.num_sampled == 0,
            "hparam 'vocab_parallel' cannot be combined with xla=true with num_sampled=0: the vocabulary's rows and "
            "their gradients travel between their owners, outside any compiled part",
            dict(hpconfig="vocab_parallel=true,xla=true,num_sampled=0")),
    Refusal(lambda c: c.hps.vocab_parallel and not c.launch.exchange,
            "--no_exchange cannot be used with vocab_parallel=true: a step's rows come from the ranks that own them",
            dict(hpconfig="vocab_parallel=true", exchange=False)),
)


def check_combination(combination):
    """The first refusal of REFUSALS that `combination` meets, as a one-line error."""
    for refusal in REFUSALS:
        if refusal.refused(combination):
            raise console.UserError(refusal.reason.format(**combination.hps.to_dict()))


def start_ranks(hps, stall_warning_seconds=60.0):
    """Horovod's ranks for a run of `hps` (able to form nodes when the run may span them)."""
    return collectives.init(stall_warning_seconds=stall_warning_seconds, process_sets=modes.may_span_nodes(hps))


class TrainingStack(typing.NamedTuple):
    """What a run trains with: its ranks, sync mode, model, training state and trainer."""
    ranks: object
    mode: object
    model: LSTMPLanguageModel
    state: object
    trainer: Trainer


def build(hps, vocab_size, ranks, launch=Launch()):
    """The TrainingStack of a run of `hps` over a vocabulary of `vocab_size` on `ranks`
    (start_ranks'); a refused combination is a one-line error before anything is built. A
    collective: every rank calls it."""
    node_of = None
    if modes.may_span_nodes(hps):
        try:
            node_of = collectives.node_membership(launch.ranks_per_node)
        except ValueError as err:
            raise console.UserError(f"outer_every={hps.outer_every}: {err}") from None
    node_count = max(node_of) + 1 if node_of else 1
    check_combination(Combination(hps, launch, node_count, mpi_across.can_run_beside_horovod()))
    mode = modes.choose(hps, ranks, collectives.node_groups(node_of) if node_count > 1 else None)
    model = LSTMPLanguageModel(hps, vocab_size, vocab_exchange=vocab_exchange(hps, vocab_size, mode.stepping))
    state = mode.training_state(model)
    trainer = Trainer(state, ranks, exchange=launch.exchange, exchange_ranks=mode.stepping,
                      averages_each_step=mode.averages_each_step)
    return TrainingStack(ranks, mode, model, state, trainer)
