#!/usr/bin/env python
"""Throughput of the expert exchange and of the gradient reduction on this machine (Gloo, CPU).

    python tools/bench_comm.py --nprocs 2,4 --json outputs/bench_comm.json
    python tools/bench_comm.py --nprocs 4,8 --sections device_limited --dl-tokens 4096 --dl-d-model 512

For each process count the script launches itself with ``paddle.distributed.launch``
(one thread per process) and measures, median of ``--repeats`` timed runs after one warm-up:

* ``a2a``: :meth:`ExpertExchange.dispatch` (count phase + row phase) of ``--a2a-kib`` KiB of
  expert rows per rank (rows of 1 KiB, uneven random counts over ``2 * nproc`` experts),
  for each Gloo variant (``gloo_pairwise``, ``gloo_allgather``) and route (``flat``;
  ``hier`` = 2 nodes x nproc/2 when nproc >= 4). Bandwidth = rows this rank sends (bytes,
  its own block included) / time; time = the slowest rank of each run.
* ``allreduce``: :class:`GradientReducer` (fused buckets of ``--bucket-mib``) vs
  :func:`reduce_gradients_unfused` over ``--grad-mib`` MiB of dense gradients split into 64
  parameters of varied sizes. Bandwidth = gradient bytes / time.

* ``device_limited``: the expert exchange under the real routers (DeepSeek-V2 device-limited
  routing vs plain top-k). The driver routes ``--dl-tokens`` random tokens per rank (width
  ``--dl-d-model``) through :func:`paddle_semoe.moe.make_router` with ``router=token_choice``
  and with ``router=device_limited`` (``device_groups`` = EP degree = nproc, ``device_limit``
  M from ``--device-limited-ranks``), the same gate weights and inputs for every router, and
  counts per token the distinct destination EP ranks (fan-out). :class:`ExpertExchange` sends
  **one row per kept (token, expert) assignment** (rows are expert-major, ``counts[x]`` rows
  to expert ``x``; nothing is deduplicated per rank), so its bytes are ``kept rows * D * 4``
  whatever the fan-out; device-limited routing only bounds the fan-out. The table also gives
  the bytes of an exchange that sent each token once per destination rank (``dedup``: one row
  per (token, rank); the receiver would copy it to its local experts), which is what M bounds.
  Timed (row phase, slowest rank): the real ``ExpertExchange.dispatch_rows`` with the routed
  count matrix, and the bare transport ``exchange_rows`` with the dedup split matrix.

Prints tables and writes JSON with ``--json``. Timings are for comparing variants on one
machine (here: 2 shared cores, so 4 processes oversubscribe them), not absolute numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
ROW_FLOATS = 256  # 1 KiB rows
SECTIONS = ("a2a", "allreduce", "device_limited")
sys.path.insert(0, str(REPO))  # paddle_semoe, for the routing of the driver and the workers


def _parse_list(text: str, cast=float) -> list:
    return [cast(v) for v in text.split(",") if v.strip()]


# ----------------------------------------------------------------------------- device-limited routing
@dataclass(frozen=True)
class DLCase:
    """One routing variant of the device-limited section: ``limit`` 0 = plain top-k."""

    router: str  # token_choice | device_limited
    limit: int

    @property
    def label(self) -> str:
        return "top-k (no limit)" if self.limit == 0 else f"device-limited M={self.limit}"


def dl_cases(limits: list[int], ep: int, num_experts: int, top_k: int) -> tuple[list[DLCase], list[str]]:
    """The routing variants for EP degree ``ep``: unlimited top-k first, then each valid M.
    Returns (cases, notes on the skipped M values)."""
    cases, notes = [DLCase("token_choice", 0)], []
    for m in limits:
        if not 1 <= m <= ep:
            notes.append(f"M={m} skipped at EP={ep}: needs 1 <= M <= EP")
        elif m * (num_experts // ep) < top_k:
            notes.append(f"M={m} skipped at EP={ep}: {m} ranks x {num_experts // ep} experts < top_k={top_k}")
        else:
            cases.append(DLCase("device_limited", m))
    return cases, notes


def exchange_accounting(expert_ids_TK: np.ndarray, kept_TK: np.ndarray, num_experts: int, ep_degree: int) -> dict:
    """What one rank's tokens put on the expert exchange (numpy, no communication).

    Args:
        expert_ids_TK: int ``[T, K]`` experts chosen per token (``Dispatch.expert_ids``).
        kept_TK: bool ``[T, K]`` whether the choice kept a row (``Dispatch.positions >= 0``).
        num_experts: ``E``; expert ``x`` lives on EP rank ``x // (E / ep_degree)``.
        ep_degree: ``P``, EP ranks.

    Returns a dict of numpy arrays:
        ``counts_E`` int64 ``[E]`` kept rows per expert (the exchange's ``counts``);
        ``rows_per_rank_P`` int64 ``[P]`` rows the exchange sends to each rank (one per kept
        (token, expert));
        ``tokens_per_rank_P`` int64 ``[P]`` tokens with at least one kept row on each rank (rows
        of an exchange deduplicated per (token, rank));
        ``fanout_T`` int64 ``[T]`` distinct destination ranks of each token's kept rows;
        ``selected_fanout_T`` int64 ``[T]`` distinct ranks of each token's chosen experts
        (kept or dropped: what the router limits).
    """
    ids = np.asarray(expert_ids_TK, dtype=np.int64)
    kept = np.asarray(kept_TK, dtype=bool)
    if ids.ndim != 2 or kept.shape != ids.shape:
        raise ValueError(f"expert_ids must be [T, K] and kept the same shape, got {ids.shape} and {kept.shape}")
    if ep_degree < 1 or num_experts % ep_degree:
        raise ValueError(f"ep_degree must be >= 1 and divide num_experts={num_experts}, got {ep_degree}")
    if ids.size and (ids.min() < 0 or ids.max() >= num_experts):
        raise ValueError(f"expert ids must be in [0, {num_experts}), got range [{ids.min()}, {ids.max()}]")
    T = ids.shape[0]
    rank_TK = ids // (num_experts // ep_degree)
    token_TK = np.broadcast_to(np.arange(T)[:, None], ids.shape)
    kept_hit = np.zeros((T, ep_degree), dtype=bool)
    kept_hit[token_TK[kept], rank_TK[kept]] = True
    selected_hit = np.zeros((T, ep_degree), dtype=bool)
    selected_hit[token_TK.reshape(-1), rank_TK.reshape(-1)] = True
    return dict(
        counts_E=np.bincount(ids[kept], minlength=num_experts).astype(np.int64),
        rows_per_rank_P=np.bincount(rank_TK[kept], minlength=ep_degree).astype(np.int64),
        tokens_per_rank_P=kept_hit.sum(axis=0).astype(np.int64),
        fanout_T=kept_hit.sum(axis=1).astype(np.int64),
        selected_fanout_T=selected_hit.sum(axis=1).astype(np.int64),
    )


def route_device_limited(
    case: DLCase, *, tokens: int, d_model: int, num_experts: int, top_k: int, ep_degree: int,
    capacity_factor: float, seed: int, ep_rank: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Route EP rank ``ep_rank``'s tokens with the real router of ``case``.

    Gate weights: ``N(0, 0.02)`` from ``seed`` (the same for every case and rank); tokens:
    standard normal ``[tokens, d_model]`` float32 from ``seed + 1 + ep_rank`` (the same for
    every case). ``capacity_factor <= 0``: dropless. Returns (expert_ids int64 [T, K],
    kept bool [T, K], counts int64 [E] = ``Dispatch.counts``, the exchange's counts).
    """
    import paddle

    from paddle_semoe.moe import MoEConfig, make_router

    extra = dict(device_groups=ep_degree, device_limit=case.limit) if case.router == "device_limited" else {}
    cfg = MoEConfig(
        num_experts=num_experts, top_k=top_k, router=case.router, d_model=d_model, d_ff=d_model,
        dropless=capacity_factor <= 0, capacity_factor=capacity_factor if capacity_factor > 0 else 1.0, **extra,
    )
    router = make_router(cfg)
    router.eval()
    weight = np.random.default_rng(seed).normal(0.0, 0.02, (d_model, num_experts)).astype(np.float32)
    router.weight.set_value(paddle.to_tensor(weight))
    x = np.random.default_rng(seed + 1 + ep_rank).standard_normal((tokens, d_model)).astype(np.float32)
    with paddle.no_grad():
        d, _ = router.route(paddle.to_tensor(x), capacity_factor=cfg.capacity_factor_for(True))
    return d.expert_ids.numpy().astype(np.int64), d.positions.numpy() >= 0, d.counts.numpy().astype(np.int64)


def device_limited_plan(args: argparse.Namespace, ep: int) -> tuple[list[dict], list[str]]:
    """Route every EP rank's tokens for every case; per case the [P, E] count matrix, the
    [P, P] dedup split matrix and the byte / fan-out summary (the worker times them)."""
    cases, notes = dl_cases(args.device_limited_ranks, ep, args.dl_experts, args.dl_top_k)
    row_bytes = args.dl_d_model * 4
    out = []
    for case in cases:
        accs = []
        for r in range(ep):
            ids, kept, counts = route_device_limited(
                case, tokens=args.dl_tokens, d_model=args.dl_d_model, num_experts=args.dl_experts,
                top_k=args.dl_top_k, ep_degree=ep, capacity_factor=args.dl_capacity_factor,
                seed=args.dl_seed, ep_rank=r,
            )
            acc = exchange_accounting(ids, kept, args.dl_experts, ep)
            if not np.array_equal(acc["counts_E"], counts):
                raise RuntimeError(f"{case.label}, rank {r}: kept choices per expert differ from Dispatch.counts")
            accs.append(acc)
        rows_PP = np.stack([a["rows_per_rank_P"] for a in accs])
        dedup_PP = np.stack([a["tokens_per_rank_P"] for a in accs])
        off = ~np.eye(ep, dtype=bool)
        fan = np.concatenate([a["fanout_T"] for a in accs])
        sel = np.concatenate([a["selected_fanout_T"] for a in accs])
        out.append(dict(
            variant=case.label, router=case.router, limit=case.limit, ep=ep,
            tokens_per_rank=args.dl_tokens, d_model=args.dl_d_model, experts=args.dl_experts,
            top_k=args.dl_top_k, capacity_factor=args.dl_capacity_factor,
            count_matrix=np.stack([a["counts_E"] for a in accs]).tolist(),
            dedup_splits=dedup_PP.tolist(),
            # bytes one rank sends (mean over the EP ranks), its own block included / off-rank only
            sent_bytes=float(rows_PP.sum(axis=1).mean() * row_bytes),
            sent_offrank_bytes=float((rows_PP * off).sum(axis=1).mean() * row_bytes),
            dedup_bytes=float(dedup_PP.sum(axis=1).mean() * row_bytes),
            dedup_offrank_bytes=float((dedup_PP * off).sum(axis=1).mean() * row_bytes),
            # bytes the busiest rank receives (its own block included): the slowest receiver
            max_recv_bytes=float(rows_PP.sum(axis=0).max() * row_bytes),
            dedup_max_recv_bytes=float(dedup_PP.sum(axis=0).max() * row_bytes),
            fanout_mean=float(fan.mean()), fanout_max=int(fan.max()),
            selected_fanout_max=int(sel.max()),
            fanout_hist=np.bincount(fan, minlength=ep + 1).tolist(),
        ))
    return out, notes


# ----------------------------------------------------------------------------- worker
def _timed(fn, repeats: int, dist) -> list[float]:
    """Per run: barrier, time fn, the slowest rank's time (all-reduce max)."""
    import paddle

    times = []
    for i in range(repeats + 1):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        dt = paddle.to_tensor([time.perf_counter() - t0], dtype="float64")
        dist.all_reduce(dt, op=dist.ReduceOp.MAX)
        if i:  # the first run is the warm-up
            times.append(float(dt.item()))
    return times


def worker(args: argparse.Namespace) -> None:
    import numpy as np
    import paddle
    import paddle.distributed as dist

    sys.path.insert(0, str(REPO))
    from paddle_semoe.comm import (
        ExpertExchange,
        GradientReducer,
        build_topology,
        make_communicator,
        reduce_gradients_unfused,
    )

    dist.init_parallel_env()
    world, rank = dist.get_world_size(), dist.get_rank()
    routes = {"flat": build_topology(world, ranks_per_node=world)}
    if world >= 4 and world % 2 == 0:
        routes["hier"] = build_topology(world, ranks_per_node=world // 2)
    El = 2
    E = world * El
    rows_out: list[dict] = []
    rng = np.random.default_rng(1000 + rank)
    for kib in (args.a2a_kib if "a2a" in args.sections else []):
        n_rows = max(1, int(kib))
        weights = rng.dirichlet(np.ones(E) * 0.7)  # uneven
        counts = rng.multinomial(n_rows, weights).astype(np.int32)
        x = paddle.to_tensor(rng.standard_normal((n_rows, ROW_FLOATS)).astype(np.float32))
        c = paddle.to_tensor(counts)
        for backend in ("gloo_pairwise", "gloo_allgather"):
            comm = make_communicator(backend, rank=rank, timeout_s=300)
            for route, topo in routes.items():
                ex = ExpertExchange(topo, El, communicator=comm, hierarchical=(route == "hier"))
                times = _timed(lambda: ex.dispatch(x, c), args.repeats, dist)
                sent = n_rows * ROW_FLOATS * 4
                med = statistics.median(times)
                rows_out.append(dict(op="a2a", variant=f"{backend}/{route}", size_bytes=sent,
                                     median_s=med, mb_per_s=sent / med / 1e6, times_s=times))
    sizes = np.array([1 + (i % 7) * 3 for i in range(64)], dtype=np.float64)
    for mib in (args.grad_mib if "allreduce" in args.sections else []):
        total = int(mib * (1 << 20) / 4)
        numels = np.maximum(1, (sizes / sizes.sum() * total).astype(np.int64))
        params = []
        for n in numels:
            p = paddle.create_parameter([int(n)], "float32")
            p.grad = paddle.ones([int(n)], dtype="float32")
            params.append(p)
        topo = routes["flat"]
        comm = make_communicator("gloo", rank=rank, timeout_s=300)
        nbytes = int(numels.sum()) * 4
        variants = {f"fused/{int(b)}MiB": GradientReducer(params, topo, comm, int(b * (1 << 20))).reduce for b in args.bucket_mib}
        variants["per-param"] = lambda: reduce_gradients_unfused(params, topo, comm)
        for name, fn in variants.items():
            times = _timed(fn, args.repeats, dist)
            med = statistics.median(times)
            rows_out.append(dict(op="allreduce", variant=name, size_bytes=nbytes, median_s=med,
                                 mb_per_s=nbytes / med / 1e6, times_s=times))
    dl_rows = []
    if "device_limited" in args.sections:
        dl_rows = _worker_device_limited(args, routes["flat"], rank, dist)
    if rank == 0:
        (args.out / "results.json").write_text(json.dumps(rows_out))
        (args.out / "device_limited.json").write_text(json.dumps(dl_rows))


def _worker_device_limited(args: argparse.Namespace, topo, rank: int, dist) -> list[dict]:
    """Time the expert exchange with the routed count matrices of the driver's plan.

    Per case: ``ExpertExchange.dispatch_rows`` (the real row phase: one row per kept
    (token, expert), with its permutations) for the [P, E] count matrix, and the transport's
    ``exchange_rows`` for the [P, P] dedup split matrix (one row per (token, rank))."""
    import paddle

    from paddle_semoe.comm import ExpertExchange, make_communicator

    plan_cases = json.loads(args.dl_plan.read_text())
    comm = make_communicator(args.dl_backend, rank=rank, timeout_s=300)
    group = topo.ep_group
    me = group.rank_in_group
    rng = np.random.default_rng(2000 + rank)

    def buffers(case: dict):
        C = np.asarray(case["count_matrix"], dtype=np.int64)
        S = np.asarray(case["dedup_splits"], dtype=np.int64)
        P, E = C.shape
        ex = ExpertExchange(topo, E // P, communicator=comm)
        plan = ex.plan_from_count_matrix(C)
        rows = paddle.to_tensor(rng.standard_normal((plan.num_send_rows, case["d_model"])).astype(np.float32))
        dedup = paddle.to_tensor(rng.standard_normal((int(S[me].sum()), case["d_model"])).astype(np.float32))
        return C, S, E // P, ex, plan, rows, dedup

    for case in plan_cases:  # warm every case up (and check the row counts) before any is timed
        C, S, El, ex, plan, rows, dedup = buffers(case)
        local, _ = ex.dispatch_rows(rows, plan)
        comm.exchange_rows(dedup, S, group)
        if local.shape[0] != int(C[:, me * El:(me + 1) * El].sum()):
            raise RuntimeError(f"rank {rank}: the exchange returned {local.shape[0]} rows, the count matrix says "
                               f"{int(C[:, me * El:(me + 1) * El].sum())}")
    out = []
    for case in plan_cases:
        C, S, El, ex, plan, rows, dedup = buffers(case)
        t_rows = _timed(lambda: ex.dispatch_rows(rows, plan), args.repeats, dist)
        t_dedup = _timed(lambda: comm.exchange_rows(dedup, S, group), args.repeats, dist)
        out.append(dict(variant=case["variant"], rows_median_s=statistics.median(t_rows), rows_times_s=t_rows,
                        dedup_median_s=statistics.median(t_dedup), dedup_times_s=t_dedup))
    return out


# ----------------------------------------------------------------------------- driver
def launch(nproc: int, args: argparse.Namespace, work: Path) -> tuple[list[dict], list[dict]]:
    """Run the workers on ``nproc`` processes: (a2a/allreduce rows, device-limited rows)."""
    out = work / f"n{nproc}"
    out.mkdir(parents=True, exist_ok=True)
    dl_plan: list[dict] = []
    if "device_limited" in args.sections:
        dl_plan, notes = device_limited_plan(args, nproc)
        for note in notes:
            print(f"device_limited: {note}", file=sys.stderr)
        (out / "dl_plan.json").write_text(json.dumps(dl_plan))
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", GLOG_minloglevel="2",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", str(nproc),
           "--log_dir", str(out / "log"), str(Path(__file__).resolve()), "--worker", "--out", str(out),
           "--a2a-kib", ",".join(map(str, args.a2a_kib)), "--grad-mib", ",".join(map(str, args.grad_mib)),
           "--bucket-mib", ",".join(map(str, args.bucket_mib)), "--repeats", str(args.repeats),
           "--sections", ",".join(args.sections), "--dl-plan", str(out / "dl_plan.json"),
           "--dl-backend", args.dl_backend]
    res = subprocess.run(cmd, cwd=str(out), env=env, capture_output=True, text=True, timeout=args.timeout)
    if res.returncode != 0:
        log = (out / "log" / "workerlog.0").read_text(errors="replace") if (out / "log" / "workerlog.0").exists() else ""
        raise RuntimeError(f"{nproc} processes failed ({res.returncode}):\n{res.stdout[-2000:]}\n{log[-4000:]}")
    rows = json.loads((out / "results.json").read_text())
    for r in rows:
        r["nproc"] = nproc
    timed = {t["variant"]: t for t in json.loads((out / "device_limited.json").read_text())}
    dl_rows = []
    for case in dl_plan:
        t = timed[case["variant"]]
        timing = {k: v for k, v in t.items() if k != "variant"}
        dl_rows.append(dict(nproc=nproc, backend=args.dl_backend, **case, **timing))
    return rows, dl_rows


def _fmt_size(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB" if n >= (1 << 20) else f"{n / 1024:.0f} KiB"


def print_table(rows: list[dict]) -> None:
    header = f"{'nproc':>5}  {'op':<9}  {'variant':<22}  {'size/rank':>9}  {'median ms':>10}  {'MB/s':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['nproc']:>5}  {r['op']:<9}  {r['variant']:<22}  {_fmt_size(r['size_bytes']):>9}  "
              f"{r['median_s'] * 1e3:>10.2f}  {r['mb_per_s']:>8.1f}")


def print_device_limited_table(rows: list[dict]) -> None:
    """Bytes one rank sends (mean over ranks) and row-phase time (slowest rank), per variant."""
    if not rows:
        return
    r0 = rows[0]
    print(f"\ndevice-limited routing: {r0['tokens_per_rank']} tokens/rank, D={r0['d_model']}, E={r0['experts']}, "
          f"top_k={r0['top_k']}, capacity_factor={r0['capacity_factor'] or 'dropless'}, fp32 rows, {r0['backend']}")
    print("actual = ExpertExchange (one row per kept (token, expert)); dedup = one row per (token, rank), "
          "not what the exchange does (transport only)")
    print("MiB: sent by one rank (mean over ranks, own block included); off-rank: without its own block; "
          "max recv: received by the busiest rank")
    header = (f"{'EP':>3}  {'variant':<22}  {'fan-out':>7}  {'max':>3}  {'actual MiB':>10}  {'off-rank':>8}  "
              f"{'max recv':>8}  {'actual ms':>9}  {'dedup MiB':>9}  {'off-rank':>8}  {'max recv':>8}  {'dedup ms':>8}  "
              f"{'dedup vs top-k':>14}")
    print(header)
    print("-" * len(header))
    base = {}
    for r in rows:
        if r["limit"] == 0:
            base[r["nproc"]] = r["dedup_bytes"]
        ref = base.get(r["nproc"])
        saving = "baseline" if r["limit"] == 0 else f"{100 * (1 - r['dedup_bytes'] / ref):.0f}% less" if ref else "-"
        mib = 1 << 20
        print(f"{r['nproc']:>3}  {r['variant']:<22}  {r['fanout_mean']:>7.2f}  {r['fanout_max']:>3}  "
              f"{r['sent_bytes'] / mib:>10.2f}  {r['sent_offrank_bytes'] / mib:>8.2f}  {r['max_recv_bytes'] / mib:>8.2f}  "
              f"{r['rows_median_s'] * 1e3:>9.2f}  {r['dedup_bytes'] / mib:>9.2f}  {r['dedup_offrank_bytes'] / mib:>8.2f}  "
              f"{r['dedup_max_recv_bytes'] / mib:>8.2f}  {r['dedup_median_s'] * 1e3:>8.2f}  "
              f"{saving:>14}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nprocs", default="2,4", help="process counts, comma separated")
    parser.add_argument("--a2a-kib", default="64,1024,8192", help="KiB of rows sent per rank")
    parser.add_argument("--grad-mib", default="4,32", help="MiB of gradients")
    parser.add_argument("--bucket-mib", default="4,32", help="bucket sizes of the fused variant")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"sections to run, comma separated, of {SECTIONS}")
    parser.add_argument("--device-limited-ranks", default="1,2,3",
                        help="device_limit M values (EP ranks per token) of the device-limited section; "
                             "values above the EP degree (= nproc) are skipped")
    parser.add_argument("--dl-tokens", type=int, default=1024, help="tokens per rank of the device-limited section")
    parser.add_argument("--dl-d-model", type=int, default=256, help="token width D (rows of D float32)")
    parser.add_argument("--dl-experts", type=int, default=64, help="experts E (must be divisible by every nproc)")
    parser.add_argument("--dl-top-k", type=int, default=8, help="experts per token k")
    parser.add_argument("--dl-capacity-factor", type=float, default=0.0, help="capacity factor; <= 0: dropless")
    parser.add_argument("--dl-seed", type=int, default=0, help="seed of the gate weights and tokens")
    parser.add_argument("--dl-backend", default="gloo", help="communicator of the device-limited timings")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dl-plan", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.a2a_kib = _parse_list(args.a2a_kib, float)
    args.grad_mib = _parse_list(args.grad_mib, float)
    args.bucket_mib = _parse_list(args.bucket_mib, float)
    args.sections = _parse_list(args.sections, str)
    args.device_limited_ranks = _parse_list(args.device_limited_ranks, int)
    bad = [v for v in args.sections if v not in SECTIONS]
    if bad or not args.sections:
        parser.error(f"--sections must name some of {SECTIONS}, got {bad or 'none'}")
    if args.worker:
        worker(args)
        return
    nprocs = _parse_list(args.nprocs, int)
    if "device_limited" in args.sections:
        if args.dl_tokens < 1 or args.dl_d_model < 1 or not 1 <= args.dl_top_k <= args.dl_experts:
            parser.error("--dl-tokens and --dl-d-model must be >= 1 and --dl-top-k in [1, --dl-experts]")
        uneven = [n for n in nprocs if args.dl_experts % n]
        if uneven:
            parser.error(f"--dl-experts={args.dl_experts} must be divisible by every process count, not by {uneven}")
    rows: list[dict] = []
    dl_rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench_comm_") as tmp:
        for nproc in nprocs:
            r, d = launch(nproc, args, Path(tmp))
            rows += r
            dl_rows += d
    if rows:
        print_table(rows)
    print_device_limited_table(dl_rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {k: v for k, v in vars(args).items() if k not in ("json", "out", "dl_plan")}
        args.json.write_text(json.dumps({"rows": rows, "device_limited": dl_rows, "args": meta}, indent=2, default=str))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
