"""Expert parallelism changes nothing: EP=2/EP=4 (flat and hierarchical) equal EP=1 on the same
global batch in outputs, losses and gradients (multi-process, Gloo, CPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.dist.launch import launch

pytestmark = pytest.mark.dist
WORKER = Path(__file__).resolve().parent / "moe_ep_worker.py"

CASES = [
    # id, world, args
    ("ep2_flat_topk_capacity", 2, ["--ep", "2", "--rpn", "2", "--cf", "1.0"]),
    ("ep2_hier_gshard_dropless", 2, ["--ep", "2", "--rpn", "1", "--hierarchical", "--gate", "gshard", "--cf", "0"]),
    ("ep4_flat_topk_dropless", 4, ["--ep", "4", "--rpn", "4", "--cf", "0"]),
    ("ep4_hier_2x2_topk_capacity", 4, ["--ep", "4", "--rpn", "2", "--hierarchical", "--cf", "0.75"]),
    ("ep2_x_edp2_switch", 4, ["--ep", "2", "--rpn", "2", "--gate", "switch", "--cf", "1.25"]),
    # the routers of paddle_semoe.moe.routers (shared experts: replicated dense parameters)
    ("ep2_aux_free_shared", 2, ["--ep", "2", "--rpn", "2", "--cf", "1.0", "--router", "aux_free", "--shared", "1"]),
    ("ep4_device_limited", 4, ["--ep", "4", "--rpn", "4", "--cf", "1.0", "--router", "device_limited"]),
    ("ep2_expert_choice", 2, ["--ep", "2", "--rpn", "2", "--cf", "1.0", "--router", "expert_choice"]),
]


@pytest.mark.parametrize("name,world,args", CASES, ids=[c[0] for c in CASES])
def test_expert_parallel_equals_single_rank(tmp_path, name, world, args):
    res = launch(WORKER, world, tmp_path, args, timeout_s=240)
    assert res.returncode == 0 and len(res.results) == world, res.describe()
    dropped_any = False
    for rank, r in res.results.items():
        what = f"{name} rank {rank}"
        np.testing.assert_allclose(r["y"], r["ref_y"], rtol=1e-5, atol=1e-6, err_msg=f"{what} y")
        np.testing.assert_allclose(r["aux"], r["ref_aux"], rtol=1e-5, err_msg=f"{what} aux")
        np.testing.assert_allclose(r["loss"], r["ref_loss"], rtol=1e-5, atol=1e-7, err_msg=f"{what} loss")
        np.testing.assert_array_equal(r["kept"], r["ref_kept"], err_msg=f"{what} kept per expert")
        np.testing.assert_allclose(r["router_grad"], r["ref_router_grad"], rtol=1e-4, atol=1e-7, err_msg=f"{what} gate grad")
        for p in ("w1", "b1", "w2", "b2"):
            np.testing.assert_allclose(r[f"{p}_grad"], r[f"ref_{p}_grad"], rtol=1e-4, atol=1e-7, err_msg=f"{what} {p} grad")
            if f"shared_{p}_grad" in r:
                np.testing.assert_allclose(r[f"shared_{p}_grad"], r[f"ref_shared_{p}_grad"], rtol=1e-4, atol=1e-7,
                                           err_msg=f"{what} shared {p} grad")
        dropped_any |= float(r["dropped"]) > 0
    # gate gradients are identical on every rank after the reduction
    g0 = res.results[0]["router_grad"]
    for r in res.results.values():
        np.testing.assert_array_equal(r["router_grad"], g0)
    if "--cf" in args and args[args.index("--cf") + 1] in ("1.0", "0.75") and "expert_choice" not in args:
        assert dropped_any, "the capacity cases must actually drop tokens"
