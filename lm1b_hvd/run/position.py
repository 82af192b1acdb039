"""Where a run stands: each rank's place in its data and its LSTM rows between two steps
(`RunPoint`), and what a checkpoint keeps of every rank's (`RunPosition`), with the small
records a run keeps beside it as JSON (the learning-rate schedule's counts, the nodes of a
two-level run: model.pieces, kind "json").
"""
import dataclasses
import json
import typing

import numpy as np
import tensorflow as tf

from lm1b_hvd.data.dataset import StreamPosition
from lm1b_hvd.model import ops


@dataclasses.dataclass(frozen=True)
class RunPoint:
    """Where one rank's run stands between two steps: what the loop carries from step to step
    and what a checkpoint gives back, so that the run continues exactly."""
    step: int
    position: StreamPosition  # this rank's training stream
    row_state: list  # this rank's LSTM rows: per layer an ops.LSTMState

    @classmethod
    def start(cls, step, model):
        """Step `step` at the start of the data, the LSTM rows zero."""
        return cls(step, StreamPosition(), model.zero_state(model.hps.batch_size))


class RankPosition(typing.NamedTuple):
    """What one rank saved: its data position (a StreamPosition dict) and its LSTM rows (an
    array); or neither, and why this run cannot continue from them."""
    stream: dict = None
    row_state: np.ndarray = None
    unusable: str = ""


class RunPosition(tf.Module):
    """Every rank's data stream and LSTM rows when the checkpoint was taken, and the records
    kept beside them (`records`: name -> a JSON value, e.g. the learning-rate schedule's counts).
    Held in the same checkpoint as the weights, so a crash can never leave one without the other."""

    def __init__(self):
        super().__init__(name="run_position")
        self.streams = tf.Variable("", dtype=tf.string, trainable=False)  # JSON, see store()
        self.row_states = tf.Variable(tf.zeros([0]), shape=tf.TensorShape(None), trainable=False)

    def store(self, seed, batch_size, positions, row_states, records):
        """`positions` (StreamPosition dicts) and `row_states` (arrays), rank by rank, and the
        `records` (a dict of JSON values; a None value is left out)."""
        saved = {"seed": seed, "batch_size": batch_size, "positions": positions,
                 **{name: value for name, value in records.items() if value is not None}}
        self.streams.assign(json.dumps(saved))
        self.row_states.assign(np.stack(row_states))

    def clear(self):
        self.streams.assign("")

    def record(self, name):
        """The record `name`, or None (no position, or saved without it)."""
        text = self.streams.numpy().decode()
        return json.loads(text).get(name) if text else None

    def for_rank(self, rank, num_ranks, seed, batch_size):
        """The RankPosition this rank saved; unusable where the saved run differs (rank count,
        batch size, seed) or saved no position."""
        text = self.streams.numpy().decode()
        if not text:
            return RankPosition(unusable="the checkpoint holds no data position")
        saved = json.loads(text)
        positions = saved["positions"]
        if len(positions) != num_ranks:
            return RankPosition(
                unusable=f"the checkpoint was written by {len(positions)} rank(s), this run has {num_ranks}")
        if saved["batch_size"] != batch_size or saved["seed"] != seed:
            return RankPosition(unusable="the checkpoint's batch_size or seed differs from this run's")
        return RankPosition(stream=positions[rank], row_state=self.row_states.numpy()[rank])


def row_state_to_array(row_state):
    """The per-row LSTM state as one array [layers, batch, state_size + projected_size]."""
    return np.stack([np.concatenate([c.numpy(), h.numpy()], axis=1) for c, h in row_state])


def row_state_from_array(array, state_size):
    return [ops.LSTMState(tf.constant(layer[:, :state_size]), tf.constant(layer[:, state_size:]))
            for layer in np.asarray(array, np.float32)]
