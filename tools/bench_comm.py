#!/usr/bin/env python
"""Throughput of the expert exchange and of the gradient reduction on this machine (Gloo, CPU).

    python tools/bench_comm.py --nprocs 2,4 --json outputs/bench_comm.json

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

Prints a table and writes JSON with ``--json``. Timings are for comparing variants on one
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
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROW_FLOATS = 256  # 1 KiB rows


def _parse_list(text: str, cast=float) -> list:
    return [cast(v) for v in text.split(",") if v.strip()]


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
    for kib in args.a2a_kib:
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
    for mib in args.grad_mib:
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
    if rank == 0:
        (args.out / "results.json").write_text(json.dumps(rows_out))


# ----------------------------------------------------------------------------- driver
def launch(nproc: int, args: argparse.Namespace, work: Path) -> list[dict]:
    out = work / f"n{nproc}"
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", GLOG_minloglevel="2",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", str(nproc),
           "--log_dir", str(out / "log"), str(Path(__file__).resolve()), "--worker", "--out", str(out),
           "--a2a-kib", ",".join(map(str, args.a2a_kib)), "--grad-mib", ",".join(map(str, args.grad_mib)),
           "--bucket-mib", ",".join(map(str, args.bucket_mib)), "--repeats", str(args.repeats)]
    res = subprocess.run(cmd, cwd=str(out), env=env, capture_output=True, text=True, timeout=args.timeout)
    if res.returncode != 0:
        log = (out / "log" / "workerlog.0").read_text(errors="replace") if (out / "log" / "workerlog.0").exists() else ""
        raise RuntimeError(f"{nproc} processes failed ({res.returncode}):\n{res.stdout[-2000:]}\n{log[-4000:]}")
    rows = json.loads((out / "results.json").read_text())
    for r in rows:
        r["nproc"] = nproc
    return rows


def _fmt_size(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB" if n >= (1 << 20) else f"{n / 1024:.0f} KiB"


def print_table(rows: list[dict]) -> None:
    header = f"{'nproc':>5}  {'op':<9}  {'variant':<22}  {'size/rank':>9}  {'median ms':>10}  {'MB/s':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['nproc']:>5}  {r['op']:<9}  {r['variant']:<22}  {_fmt_size(r['size_bytes']):>9}  "
              f"{r['median_s'] * 1e3:>10.2f}  {r['mb_per_s']:>8.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nprocs", default="2,4", help="process counts, comma separated")
    parser.add_argument("--a2a-kib", default="64,1024,8192", help="KiB of rows sent per rank")
    parser.add_argument("--grad-mib", default="4,32", help="MiB of gradients")
    parser.add_argument("--bucket-mib", default="4,32", help="bucket sizes of the fused variant")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.a2a_kib = _parse_list(args.a2a_kib, float)
    args.grad_mib = _parse_list(args.grad_mib, float)
    args.bucket_mib = _parse_list(args.bucket_mib, float)
    if args.worker:
        worker(args)
        return
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench_comm_") as tmp:
        for nproc in _parse_list(args.nprocs, int):
            rows += launch(nproc, args, Path(tmp))
    print_table(rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows, "args": {k: v for k, v in vars(args).items() if k not in ("json", "out")}}, indent=2, default=str))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
