"""run/stack.py's one table of the combinations a run refuses, checked row by row from the
table itself: each row's example is refused with that row's line, and the plain run of the same
preset is not. (tests/test_bad_input.py runs some of them through `train` as a user would.)"""
import pytest

from lm1b_hvd import console, hparams
from lm1b_hvd.run.stack import REFUSALS, Combination, Launch, check_combination


def combination(example):
    example = dict(example)
    hps = hparams.build("demo", example.pop("hpconfig", ""))
    nodes, no_mpi_beside = example.pop("nodes", 1), example.pop("no_mpi_beside", "")
    return Combination(hps, Launch(**example), nodes, no_mpi_beside)


@pytest.mark.parametrize("refusal", REFUSALS, ids=[refusal.example["hpconfig"] + "".join(
    f",{key}={value}" for key, value in refusal.example.items() if key != "hpconfig") for refusal in REFUSALS])
def test_each_refused_combination_says_its_own_reason_in_one_line(refusal):
    refused = combination(refusal.example)
    with pytest.raises(console.UserError) as raised:
        check_combination(refused)
    said = str(raised.value)
    assert said == refusal.reason.format(**refused.hps.to_dict())
    assert "\n" not in said and "{" not in said


@pytest.mark.parametrize("accepted", [
    {}, {"hpconfig": "vocab_parallel=true"}, {"hpconfig": "outer_every=4", "nodes": 2},
    {"hpconfig": "outer_every=4,precision=fp16", "nodes": 1},  # one node: every step synchronous
    {"hpconfig": "vocab_parallel=true,xla=true"}, {"hpconfig": "outer_every=0", "elastic": True},
    {"hpconfig": "outer_every=4,outer_slots=local,outer_overlap=true", "nodes": 2},
    {"hpconfig": "outer_every=4,outer_slots=local,outer_overlap=true", "nodes": 1, "no_mpi_beside": "Gloo"},
    {"exchange": False}])
def test_what_is_not_in_the_table_is_accepted(accepted):
    check_combination(combination(accepted))
