"""The vocabulary sharded over real `horovodrun` ranks (vocab_parallel) applies the update of the
replicated trainer: same seeds, same data, dropout on, every variable within 1e-5 after 30 steps."""
import numpy as np
import pytest

from tests.test_multiprocess import horovodrun
from tests.workers import vocab_parallel as worker

STEPS = 30


@pytest.mark.parametrize("ranks, grad_combine", [(2, "rank_clip"), (2, "tape"), (4, "rank_clip"), (4, "tape")])
def test_sharded_vocabulary_gives_the_replicated_update(tmp_path, ranks, grad_combine):
    result = horovodrun(["-m", "tests.workers.vocab_parallel", str(tmp_path), grad_combine, str(STEPS)], np_=ranks,
                        timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    covered = {name: [] for name in ("emb", "softmax_w", "softmax_b")}
    for rank in range(ranks):
        replicated, sharded = (np.load(tmp_path / f"{kind}{rank}.npz") for kind in ("replicated", "sharded"))
        for name in replicated.files:
            if name.endswith("_rows"):
                continue
            if name.split("_slot")[0] in covered:
                first, stop = sharded[f"{name.split('_slot')[0]}_rows"]
                expected = replicated[name][first:stop]
                if "_slot" not in name:
                    covered[name].append((first, stop))
            else:
                expected = replicated[name]
            np.testing.assert_allclose(sharded[name], expected, rtol=0, atol=1e-5, err_msg=f"rank {rank}: {name}")
        assert np.abs(replicated["emb_slot"] - 1.0).max() > 1e-3, "the steps changed the tables' slots"
    for name, shares in covered.items():
        assert sorted(shares)[0][0] == 0 and sorted(shares)[-1][1] == worker.VOCAB, name
        assert all(a[1] == b[0] for a, b in zip(sorted(shares), sorted(shares)[1:])), f"{name}: every row once"
