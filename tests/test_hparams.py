import pytest

from lm1b_hvd import hparams


def test_defaults_are_the_original_lstm_2048_512():
    hps = hparams.build("default")
    assert (hps.batch_size, hps.num_steps, hps.num_shards, hps.num_layers) == (128, 20, 8, 1)
    assert (hps.emb_size, hps.state_size, hps.projected_size) == (512, 2048, 512)
    assert (hps.learning_rate, hps.max_grad_norm, hps.keep_prob) == (0.2, 10.0, 0.9)
    assert hps.num_sampled == 8192 and hps.average_params is True and hps.ema_decay == 0.999


def test_override_string_of_the_original_is_typed():
    hps = hparams.build("default", "num_layers=2,state_size=4096")
    assert hps.num_layers == 2 and hps.state_size == 4096
    hps = hparams.build("demo", " keep_prob=1 , average_params=false,learning_rate=0.05,")
    assert hps.keep_prob == 1.0 and isinstance(hps.keep_prob, float)
    assert hps.average_params is False
    assert hps.learning_rate == 0.05


@pytest.mark.parametrize("override, message", [
    ("num_layer=2", "unknown hparam 'num_layer'"),
    ("num_layers=2.5", "hparam 'num_layers' expects an int, got '2.5'"),
    ("keep_prob=high", "hparam 'keep_prob' expects a float, got 'high'"),
    ("average_params=maybe", "hparam 'average_params' expects a bool"),
    ("num_layers", "not of the form key=value"),
    ("keep_prob=0", "'keep_prob' must be in (0, 1]"),
    ("batch_size=0", "'batch_size' must be >= 1"),
    ("precision=fp8", "hparam 'precision' expects one of fp32, bf16, fp16, got 'fp8'"),
    ("grad_combine=adasum", "hparam 'grad_combine' expects one of rank_clip, tape, got 'adasum'"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(hparams.HParamsError) as err:
        hparams.build("default", override)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_preset():
    with pytest.raises(hparams.HParamsError, match="unknown preset 'huge'"):
        hparams.build("huge")


def test_speed_options_are_off_by_default_and_typed():
    hps = hparams.build("default")
    assert (hps.precision, hps.xla, hps.grad_combine, hps.sparse_as_dense, hps.fp16_allreduce) == (
        "fp32", False, "rank_clip", False, False)
    hps = hparams.build("default", "precision=bf16,xla=true,grad_combine=tape,fp16_allreduce=true")
    assert (hps.precision, hps.xla, hps.grad_combine, hps.fp16_allreduce) == ("bf16", True, "tape", True)


def test_every_preset_is_valid_and_default_keeps_the_successors_options_off():
    for name, preset in hparams.PRESETS.items():
        assert hparams.validate(preset) == preset, name
    default = hparams.build("default")
    assert (default.lstm_factor, default.lstm_groups, default.tie_embeddings, default.variational_dropout,
            default.emb_keep_prob, default.recurrent_keep_prob, default.lr_decay, default.average_tables) == (
        0, 1, False, False, 1.0, 1.0, 1.0, False)
    assert hparams.build("big_f512").lstm_factor == 512 and hparams.build("big_g4").lstm_groups == 4
