"""The hyper-parameter record, its presets, and the original's `k=v,k=v` overrides.

Overrides are typed by the default they replace, so `keep_prob=1` becomes 1.0,
`average_params=false` a bool, and a typo or a wrong type fails at once with
the key named instead of silently training something else.
"""
import dataclasses

from lm1b_hvd import console


class HParamsError(console.UserError):
    """A preset name or an override that cannot be applied."""


@dataclasses.dataclass(frozen=True)
class HParams:
    batch_size: int = 128
    num_steps: int = 20
    num_shards: int = 8
    num_layers: int = 1
    learning_rate: float = 0.2
    max_grad_norm: float = 10.0
    keep_prob: float = 0.9
    emb_size: int = 512
    state_size: int = 2048
    projected_size: int = 512
    num_sampled: int = 8192
    average_params: bool = True
    ema_decay: float = 0.999
    seed: int = 1
    # The successors' LSTMs and regularisation; each off by default, where `default` is the paper's model.
    lstm_factor: int = 0  # F-LSTM: the gate matrix factored through this inner size; 0: the full matrix
    lstm_groups: int = 1  # G-LSTM: the gates split into this many independent groups; 1: one
    tie_embeddings: bool = False  # the softmax's weights are the embedding (needs emb_size == projected_size)
    variational_dropout: bool = False  # keep_prob's masks drawn once per row and window, shared by its steps
    emb_keep_prob: float = 1.0  # embedding dropout: each word of the vocabulary kept with this probability a step
    recurrent_keep_prob: float = 1.0  # DropConnect: each recurrent weight kept with this probability a step
    lr_decay: float = 1.0  # learning_rate x this when the heldout perplexity has not improved (--eval_every); 1: never
    lr_patience: int = 1  # evaluations without a new best before the learning rate decays
    average_tables: bool = False  # with average_params, the tables averaged too: a copy of each, a pass over it a step
    # How the step runs, not what it computes: a checkpoint resumes under any of these.
    kernels: str = "auto"  # auto | cpu | portable: lm1b_hvd's CPU kernels or TF ops only (compute_plan.py)
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp16 with dynamic loss scaling)
    xla: bool = False  # compile forward and backward with XLA
    grad_combine: str = "rank_clip"  # rank_clip: the original's per-rank clip | tape: DistributedGradientTape
    sparse_as_dense: bool = False  # allreduce embedding/softmax gradients as dense matrices
    vocab_parallel: bool = False  # each rank holds 1/N of the vocabulary's rows; alltoall fetches what a step needs
    fp16_allreduce: bool = False  # send the dense LSTM gradients as fp16 (hvd.Compression.fp16)
    # Across nodes (update.outer): synchronous inside a node, every outer_every steps an outer
    # step between the nodes on the average of what they changed (DiLoCo's outer Nesterov
    # momentum; outer_lr=1 with outer_momentum=0 is plain averaging). 0: every step synchronous.
    outer_every: int = 0
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    outer_fp16: bool = True  # the outer step's deltas and accumulator increments cross between nodes as fp16
    outer_bits: int = 16  # 16: as outer_fp16 says | 8, 4: the deltas row-wise quantized, with error feedback
    outer_slots: str = "averaged"  # averaged: Adagrad's accumulators averaged over nodes at outer steps | local: kept per node
    outer_overlap: bool = False  # the outer exchange travels during the next period (eager updates; an MPI launch)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def to_dict(self):
        return dataclasses.asdict(self)

    def to_string(self):
        return ",".join(f"{k}={v}" for k, v in self.to_dict().items())


CHOICES = {
    "kernels": ("auto", "cpu", "portable"),
    "precision": ("fp32", "bf16", "fp16"),
    "grad_combine": ("rank_clip", "tape"),
    "outer_slots": ("averaged", "local"),
}

# Shapes that decide what a checkpoint holds: a resumed run must agree on them.
MODEL_SHAPE_KEYS = ("num_shards", "num_layers", "emb_size", "state_size", "projected_size", "lstm_factor",
                    "lstm_groups", "tie_embeddings")

PRESETS = {
    # The original LSTM-2048-512 of the lm1b baseline.
    "default": HParams(),
    # Trains in minutes on 2 CPU cores on the built-in demo corpus. In its 3 minutes the steps
    # it makes matter more than its capacity: 128 cells end lower than 256 by making more of
    # them, tied embeddings learn the words' vectors from both ends, and averaging the table
    # too takes out the noise of its last updates at a rate this fast (docs/performance.md,
    # "The demo against its oracle").
    "demo": HParams(
        batch_size=32, num_steps=20, num_shards=2, emb_size=64, state_size=128,
        projected_size=64, num_sampled=512, keep_prob=1.0, learning_rate=0.4,
        ema_decay=0.995, tie_embeddings=True, average_tables=True,
    ),
    # The paper's BIG LSTM (2 x LSTM-8192-1024, ~1.8B parameters with the lm1b vocabulary, 50%
    # dropout), with f-lm's batch and clip; and f-lm's BIGLSTM as F-LSTM F512 and G-LSTM G4.
    "big": HParams(
        batch_size=256, num_layers=2, emb_size=1024, state_size=8192, projected_size=1024, keep_prob=0.5,
        max_grad_norm=1.0),
    "big_f512": HParams(
        batch_size=256, num_layers=2, emb_size=1024, state_size=8192, projected_size=1024, keep_prob=0.9,
        max_grad_norm=1.0, lstm_factor=512),
    "big_g4": HParams(
        batch_size=256, num_layers=2, emb_size=1024, state_size=8192, projected_size=1024, keep_prob=0.9,
        max_grad_norm=1.0, lstm_groups=4),
    # A corpus of about a million words, with --eval_every: `small` with tied embeddings,
    # Merity et al.'s regularisation and the tables averaged as the LSTM is (docs/performance.md,
    # "The model for a small corpus").
    "corpus": HParams(
        batch_size=32, num_steps=20, num_shards=2, emb_size=256, state_size=512, projected_size=256,
        num_sampled=2048, keep_prob=0.4, learning_rate=0.4, ema_decay=0.998, tie_embeddings=True,
        variational_dropout=True, emb_keep_prob=0.9, recurrent_keep_prob=0.5, average_tables=True),
    # For corpora of about a million words, where the default overfits at once: the plain LSTMP.
    "small": HParams(
        batch_size=32, num_steps=20, num_shards=2, emb_size=256, state_size=512,
        projected_size=256, num_sampled=2048, keep_prob=0.5, learning_rate=0.2,
        ema_decay=0.995,
    ),
}


def _parse_value(key, text, default):
    text = text.strip()
    if isinstance(default, str):
        return text  # validate() checks it against CHOICES
    if isinstance(default, bool):
        lowered = text.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise HParamsError(f"hparam '{key}' expects a bool (true/false), got '{text}'")
    try:
        if isinstance(default, int):
            return int(text)
        return float(text)
    except ValueError:
        kind = "an int" if isinstance(default, int) else "a float"
        raise HParamsError(f"hparam '{key}' expects {kind}, got '{text}'") from None


def parse_overrides(hps, overrides):
    """Applies a `k=v,k=v` string (the original's --hpconfig) on top of `hps`."""
    if not overrides or not overrides.strip():
        return hps
    defaults = hps.to_dict()
    changes = {}
    for item in overrides.split(","):
        if not item.strip():
            continue
        if "=" not in item:
            raise HParamsError(f"hparam override '{item.strip()}' is not of the form key=value")
        key, text = (part.strip() for part in item.split("=", 1))
        if key not in defaults:
            known = ", ".join(sorted(defaults))
            raise HParamsError(f"unknown hparam '{key}' (known: {known})")
        changes[key] = _parse_value(key, text, defaults[key])
    return validate(hps.replace(**changes))


def validate(hps):
    """Rejects values that would fail later with an obscure TensorFlow error. (Combinations of
    ways to run that a run refuses are run.stack's table.)"""
    positive = ("batch_size", "num_steps", "num_shards", "num_layers", "emb_size",
                "state_size", "projected_size")
    for key in positive:
        if getattr(hps, key) < 1:
            raise HParamsError(f"hparam '{key}' must be >= 1, got {getattr(hps, key)}")
    for key in ("keep_prob", "emb_keep_prob", "recurrent_keep_prob", "lr_decay"):
        if not 0.0 < getattr(hps, key) <= 1.0:
            raise HParamsError(f"hparam '{key}' must be in (0, 1], got {getattr(hps, key)}")
    if hps.outer_every < 0:
        raise HParamsError(f"hparam 'outer_every' must be >= 0 (0: synchronous across nodes), got {hps.outer_every}")
    if hps.outer_lr <= 0 or not 0.0 <= hps.outer_momentum < 1.0:
        raise HParamsError(f"hparams 'outer_lr' must be > 0 and 'outer_momentum' in [0, 1), got {hps.outer_lr} "
                           f"and {hps.outer_momentum}")
    if hps.outer_bits not in (4, 8, 16):
        raise HParamsError(f"hparam 'outer_bits' expects 4, 8 or 16, got {hps.outer_bits}")
    if hps.lr_patience < 1:
        raise HParamsError(f"hparam 'lr_patience' must be >= 1, got {hps.lr_patience}")
    _validate_lstm(hps)
    if not 0.0 <= hps.ema_decay < 1.0:
        raise HParamsError(f"hparam 'ema_decay' must be in [0, 1), got {hps.ema_decay}")
    if hps.num_sampled < 0:
        raise HParamsError(f"hparam 'num_sampled' must be >= 0 (0: full softmax), got {hps.num_sampled}")
    for key, choices in CHOICES.items():
        if getattr(hps, key) not in choices:
            raise HParamsError(f"hparam '{key}' expects one of {', '.join(choices)}, got '{getattr(hps, key)}'")
    if hps.learning_rate <= 0 or hps.max_grad_norm <= 0:
        raise HParamsError("hparams 'learning_rate' and 'max_grad_norm' must be > 0")
    return hps


def _validate_lstm(hps):
    """F-LSTM, G-LSTM and tied embeddings ask for shapes that fit them."""
    if hps.lstm_factor < 0:
        raise HParamsError(f"hparam 'lstm_factor' must be >= 0 (0: the full gate matrix), got {hps.lstm_factor}")
    if hps.lstm_groups < 1:
        raise HParamsError(f"hparam 'lstm_groups' must be >= 1, got {hps.lstm_groups}")
    if hps.lstm_factor and hps.lstm_groups > 1:
        raise HParamsError("hparams 'lstm_factor' and 'lstm_groups' cannot be combined: F-LSTM or G-LSTM, not both")
    for key in ("emb_size", "state_size", "projected_size"):
        if getattr(hps, key) % hps.lstm_groups:
            raise HParamsError(f"hparam 'lstm_groups={hps.lstm_groups}' must divide '{key}' ({getattr(hps, key)})")
    if hps.tie_embeddings and hps.emb_size != hps.projected_size:
        raise HParamsError(f"hparam 'tie_embeddings' needs emb_size == projected_size, got {hps.emb_size} and "
                           f"{hps.projected_size}")


def build(preset="default", overrides=""):
    """The record for a preset name with the override string applied."""
    if preset not in PRESETS:
        raise HParamsError(f"unknown preset '{preset}' (known: {', '.join(sorted(PRESETS))})")
    return parse_overrides(PRESETS[preset], overrides)
