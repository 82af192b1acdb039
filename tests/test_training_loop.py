"""The small pieces the training loop is made of: periodic triggers, the stop decision, the
EMA swap, the progress line."""
import time

import numpy as np
import tensorflow as tf

from lm1b_hvd.model.averaging import ExponentialMovingAverage
from lm1b_hvd.run.loop import Every, StopReason, stop_reason
from lm1b_hvd.run.reporting import Progress
from lm1b_hvd.train import parse_args
from lm1b_hvd.update.step import StepStats, Votes, stack_stats


TRAFFIC = [f"{kind}_{way}" for kind in ("allreduce", "allgather", "alltoall") for way in ("sent", "received")]


def stats(signal=0.0, time_up=0.0, checkpoint=0.0, loss_sum=20.0, words=10.0):
    return StepStats(loss_sum=loss_sum, words=words, lstm_norm=1.0, stop_signal=signal, out_of_time=time_up,
                     checkpoint=checkpoint, duplicate_bytes=0.0, **dict.fromkeys(TRAFFIC, 0.0))


def test_every_n_steps_fires_on_multiples_only():
    every = Every(steps=3)
    assert [step for step in range(1, 11) if every.due(step)] == [3, 6, 9]
    assert not any(Every().due(step) for step in range(1, 50)), "neither steps nor seconds: never"


def test_every_n_seconds_fires_once_per_interval():
    every = Every(seconds=0.05)
    assert not every.due(1)
    time.sleep(0.06)
    assert every.due(2)
    assert not every.due(3), "the clock restarts when it fires"


def test_stop_decision_signal_first_then_time_then_steps():
    assert stop_reason(stats(), 5, max_steps=10, signal_here=False) is None
    assert stop_reason(stats(), 10, max_steps=10, signal_here=False) is StopReason.MAX_STEPS
    assert stop_reason(stats(), 10, max_steps=0, signal_here=False) is None
    assert stop_reason(stats(time_up=1.0), 3, max_steps=10, signal_here=False) is StopReason.MAX_TIME
    assert stop_reason(stats(signal=1.0, time_up=2.0), 10, 10, signal_here=True) is StopReason.SIGNAL
    assert stop_reason(stats(signal=1.0), 4, 10, signal_here=False) is StopReason.SIGNAL_ON_ANOTHER_RANK


def test_step_statistics_and_votes_travel_by_name():
    """The step's statistics go through one allreduce as a vector and come back by field name."""
    named = {"loss_sum": 1.0, "words": 2.0, "lstm_norm": 3.0, "duplicate_bytes": 5.0,
             **{name: 10.0 + index for index, name in enumerate(TRAFFIC)}}
    votes = dict(zip(["stop_signal", "out_of_time", "checkpoint"], Votes(checkpoint=True).as_tensor().numpy()))
    summed = StepStats.from_vector(stack_stats({**named, **votes}).numpy() * 2)
    assert summed == StepStats(loss_sum=2.0, words=4.0, lstm_norm=6.0, duplicate_bytes=10.0, stop_signal=0.0,
                               out_of_time=0.0, checkpoint=2.0, **{name: 20.0 + 2 * index for index, name
                                                                     in enumerate(TRAFFIC)})


def test_train_flags_come_from_the_config_record_with_their_defaults():
    config = parse_args([])
    assert (config.preset, config.logdir, config.max_time) == ("demo", "runs/demo", 180.0)
    assert (config.log_every, config.checkpoint_secs, config.profile_steps) == (100, 600.0, ())
    config = parse_args(["--datadir", "D", "--checkpoint_steps", "7", "--profile_steps", "2,4", "--elastic"])
    assert (config.preset, config.logdir, config.max_time) == ("default", "runs/default", 0.0)
    assert (config.checkpoint_steps, config.profile_steps, config.elastic) == (7, (2, 4), True)


def test_ema_swap_holds_the_averages_inside_and_restores_the_weights_after():
    weights = [tf.Variable([1.0, 2.0]), tf.Variable([[3.0]])]
    ema = ExponentialMovingAverage(weights, decay=0.5)
    weights[0].assign([3.0, 6.0])
    weights[1].assign([[5.0]])
    ema.update()
    with ema.swapped_in():
        np.testing.assert_allclose(weights[0].numpy(), [2.0, 4.0])
        np.testing.assert_allclose(weights[1].numpy(), [[4.0]])
    np.testing.assert_allclose(weights[0].numpy(), [3.0, 6.0])
    np.testing.assert_allclose(weights[1].numpy(), [[5.0]])
    try:
        with ema.swapped_in():
            raise RuntimeError("evaluation failed")
    except RuntimeError:
        pass
    np.testing.assert_allclose(weights[1].numpy(), [[5.0]])  # restored even when the block raises


def test_progress_line_reports_window_loss_rate_and_eta():
    progress = Progress(start_step=100, max_steps=200)
    progress.add(stats(loss_sum=30.0, words=10.0))
    progress.add(stats(loss_sum=10.0, words=10.0))
    line = progress.line(150)
    assert line.startswith("step 150 | loss 2.000 | ") and " words/s | elapsed 0:00:00 | eta 0:00:00" in line
    assert progress.window_words == 0.0, "each line starts a new window"
