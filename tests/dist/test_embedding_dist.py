"""The hidden-dimension partitioned embedding equals a full-table lookup across real processes."""

from pathlib import Path

import numpy as np
import pytest

from tests.dist.launch import launch

pytestmark = pytest.mark.dist


@pytest.mark.parametrize("world", [2, 4])
def test_partitioned_embedding_matches_full_table(tmp_path, world):
    res = launch(Path(__file__).resolve().parent / "embedding_worker.py", world, tmp_path, timeout_s=180)
    assert res.returncode == 0 and len(res.results) == world, res.describe()
    for rank, r in res.results.items():
        np.testing.assert_allclose(r["y"], r["ref_y"], rtol=1e-6, err_msg=f"rank {rank} lookup")
        np.testing.assert_allclose(r["grad"], r["ref_grad"], rtol=1e-5, atol=1e-6, err_msg=f"rank {rank} slice grad")
        assert r["local_shape"].tolist() == [50, 12 // world]  # V x D/P per rank
