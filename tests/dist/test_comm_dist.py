"""Expert exchange, gradient fusion and failure handling across real processes (Gloo, CPU).

Two launches do all the regular work (2 processes through Fleet, 4 processes as 2 nodes x 2)
and two more check failures; workers write their arrays, the assertions run here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.comm.reference import decode_payload, make_payload, reference_dispatch
from tests.dist.comm_cases import COUNT_MODES, case_counts, make_problem, reference_grads
from tests.dist.launch import LaunchResult, launch

pytestmark = pytest.mark.dist

WORKER = Path(__file__).resolve().parent / "comm_worker.py"
WIDTH, PAD, EL = 5, 2, 2  # as in comm_worker.py
BACKENDS = ("gloo_pairwise", "gloo_allgather")
# topology name -> (world size, ep degree)
TOPOLOGIES = {"ep2_rpn2": (2, 2), "ep2_rpn1": (2, 2), "ep4_rpn2": (4, 4), "ep2x2_rpn2": (4, 2)}


@pytest.fixture(scope="module")
def run2(tmp_path_factory: pytest.TempPathFactory) -> LaunchResult:
    res = launch(WORKER, 2, tmp_path_factory.mktemp("comm2"), ["--case", "exchange", "--fleet"])
    assert res.returncode == 0 and len(res.results) == 2, res.describe()
    return res


@pytest.fixture(scope="module")
def run4(tmp_path_factory: pytest.TempPathFactory) -> LaunchResult:
    res = launch(WORKER, 4, tmp_path_factory.mktemp("comm4"), ["--case", "exchange", "--fleet"])
    assert res.returncode == 0 and len(res.results) == 4, res.describe()
    return res


@pytest.fixture
def runs(run2: LaunchResult, run4: LaunchResult) -> dict[int, LaunchResult]:
    return {2: run2, 4: run4}


def _expected(world: int, ep: int, rank: int, mode_index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(local rows, local counts, own payload) of ``rank`` for one count pattern."""
    mode = COUNT_MODES[mode_index]
    counts = case_counts(ep, EL, seed=100 + mode_index, mode=mode)
    g = rank // ep
    members = [g * ep + i for i in range(ep)]
    rows = [make_payload(m, counts[i], WIDTH) for i, m in enumerate(members)]
    local, local_counts = reference_dispatch(rows, counts, EL)
    own = make_payload(rank, counts[rank % ep], WIDTH, padding=PAD)
    return local[rank % ep], local_counts[rank % ep], own


@pytest.mark.parametrize("topo", list(TOPOLOGIES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_exchange_layout_flat_and_hierarchical(runs: dict[int, LaunchResult], topo: str, backend: str) -> None:
    world, ep = TOPOLOGIES[topo]
    res = runs[world]
    for rank in range(world):
        out = res.results[rank]
        for i, mode in enumerate(COUNT_MODES):
            exp_local, exp_counts, own = _expected(world, ep, rank, i)
            for hier in (0, 1):
                key = f"{topo}.{backend}.hier{hier}.{mode}"
                local = out[f"{key}.local"]
                np.testing.assert_array_equal(out[f"{key}.local_counts"], exp_counts, err_msg=key)
                np.testing.assert_array_equal(local, exp_local, err_msg=f"{key} rank {rank}")
                # rows prove their origin: source ranks inside this EP group, experts owned here
                origin = decode_payload(local)
                assert set(origin[:, 0]) <= set(range(rank // ep * ep, (rank // ep + 1) * ep))
                assert (origin[:, 2] // EL == rank % ep).all()
                # combine brings 2 * row + owner's EP rank back to the sender's layout
                n = int(own.shape[0] - PAD)
                back = out[f"{key}.back"]
                owner = decode_payload(own[:n])[:, 2] // EL
                np.testing.assert_array_equal(back[:n], 2.0 * own[:n] + owner[:, None], err_msg=key)
                np.testing.assert_array_equal(back[n:], 0.0)
            flat, hier = out[f"{topo}.{backend}.hier0.{mode}.local"], out[f"{topo}.{backend}.hier1.{mode}.local"]
            np.testing.assert_array_equal(flat, hier)


@pytest.mark.parametrize("topo", list(TOPOLOGIES))
def test_training_step_fused_equals_unfused_and_reference(runs: dict[int, LaunchResult], topo: str) -> None:
    world, ep = TOPOLOGIES[topo]
    res = runs[world]
    problem = make_problem(world, ep, EL, seed=world * 10 + ep)
    ref = reference_grads(problem)
    ref_norm = np.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in ref.values()))
    coef = min(1.0, 0.05 / (ref_norm + 1e-6))
    for rank in range(world):
        out = res.results[rank]
        ep_rank = int(out[f"{topo}.ep_rank"])
        assert ep_rank == rank % ep
        mine = ref["experts"][ep_rank * EL : (ep_rank + 1) * EL]
        for mode in ("fused", "unfused"):
            k = f"{topo}.step.{mode}"
            np.testing.assert_allclose(out[f"{k}.A_grad"], ref["A"], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(out[f"{k}.g_grad"], ref["g"], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(out[f"{k}.expert_grad"], mine, rtol=1e-5, atol=1e-6)
            assert float(out[f"{k}.norm"]) == pytest.approx(ref_norm, rel=1e-5)
            np.testing.assert_allclose(out[f"{k}.A"], problem.A - 0.5 * coef * ref["A"], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(out[f"{k}.experts"], problem.experts[ep_rank * EL : (ep_rank + 1) * EL] - 0.5 * coef * mine, rtol=1e-5, atol=1e-6)
        for name in ("A_grad", "g_grad", "expert_grad", "A", "g", "experts"):
            np.testing.assert_allclose(out[f"{topo}.step.fused.{name}"], out[f"{topo}.step.unfused.{name}"], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("topo", list(TOPOLOGIES))
def test_gate_grads_equal_everywhere_and_expert_grads_stay_per_rank(runs: dict[int, LaunchResult], topo: str) -> None:
    world, ep = TOPOLOGIES[topo]
    res = runs[world]
    k = f"{topo}.step.fused"
    gates = [res.results[r][f"{k}.g_grad"] for r in range(world)]
    for g in gates[1:]:
        np.testing.assert_array_equal(g, gates[0])
    experts = [res.results[r][f"{k}.expert_grad"] for r in range(world)]
    for r in range(world):
        for q in range(world):
            if q // ep == r // ep and q != r:  # same EP group, different experts: never averaged
                assert not np.allclose(experts[r], experts[q])
            if q % ep == r % ep:  # replicas of the same experts (expert_dp group): averaged
                np.testing.assert_allclose(experts[r], experts[q], rtol=1e-6, atol=1e-7)


def test_fleet_groups_are_adopted(runs: dict[int, LaunchResult]) -> None:
    """2 processes: Fleet dp=2; 4 processes: Fleet dp=2 x sharding=2 (consecutive sharding blocks)."""
    for rank in range(2):
        assert runs[2].results[rank]["ep2_rpn2.sharding_ranks"].tolist() == [-1]
    for rank in range(4):
        out = runs[4].results[rank]
        assert out["ep4_rpn2.sharding_ranks"].tolist() == ([0, 1] if rank < 2 else [2, 3])
        assert out["ep4_rpn2.dp_ranks"].tolist() == [0, 1, 2, 3]  # all ranks, not Fleet's dp=2 group


def test_dead_peer_gives_a_clear_error(tmp_path: Path) -> None:
    res = launch(WORKER, 2, tmp_path, ["--case", "fail_exit", "--timeout", "20"], timeout_s=90)
    assert res.returncode not in (0, None), res.describe()
    assert res.elapsed_s < 60, res.describe()
    log = res.logs[0]
    assert "CommError" in log, res.describe()
    assert "exchange_rows[pairwise" in log and "group ep[ranks 0,1]" in log and "peer 1" in log, res.describe()


def test_hung_peer_trips_the_watchdog(tmp_path: Path) -> None:
    timeout = 3.0
    res = launch(WORKER, 2, tmp_path, ["--case", "fail_hang", "--timeout", str(timeout)], timeout_s=90)
    assert res.returncode == 124, res.describe()  # WATCHDOG_EXIT_CODE, propagated by the launcher
    assert res.elapsed_s < 45, res.describe()  # far below Gloo's own 30 s + startup
    log = res.logs[0]
    assert "collective watchdog" in log and f"within {timeout:.1f}s" in log, res.describe()
    assert "exchange_rows[pairwise" in log and "group ep[ranks 0,1]" in log and "peer 1" in log, res.describe()
