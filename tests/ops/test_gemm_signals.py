"""Signals during the compiled ops' GEMMs (custom_ops/include/semoe/signal_guard.h).

The oneDNN in the Paddle wheel points the stack pointer at a heap workspace inside its f32 GEMM
kernels when K is large, so a signal landing there writes its frame over the heap. Before the
guard, a child process running the fused linear and the grouped FFN under a SIGTERM every
millisecond aborted ("corrupted size vs. prev_size") within a second; a training run under the
same storm crashed within 7-21 steps.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Fused linear with a tied-embedding layout (its weight gradient g^T x runs A-transposed with
# K = 256 tokens, a shape whose oneDNN kernel moves rsp to the heap) and the grouped FFN; every
# iteration's gradients must equal the first iteration's bit for bit.
STORM_CHILD = r"""
import signal, sys
import numpy as np
import paddle
from paddle_semoe import ops

hits = [0]
signal.signal(signal.SIGTERM, lambda *_: hits.__setitem__(0, hits[0] + 1))
rng = np.random.default_rng(0)

def param(*shape):
    t = paddle.to_tensor(rng.standard_normal(shape).astype("float32") * 0.1)
    t.stop_gradient = False
    return t

x, w = param(256, 64), param(256, 64)
xf = param(512, 64)
counts = paddle.to_tensor(np.array([160, 140, 112, 100], "int32"))
w1, b1, w2, b2 = param(4, 64, 128), param(4, 128), param(4, 128, 64), param(4, 64)
params = (x, w, xf, w1, b1, w2, b2)

def step():
    for p in params:
        p.clear_gradient()
    y = ops.fused_linear(x, w, None, trans_w=True, backend="custom")
    z = ops.grouped_ffn(xf, counts, w1, b1, w2, b2, backend="custom")
    ((y * y).sum() + (z * z).sum()).backward()
    return [p.grad.numpy().copy() for p in params]

first = step()
print("ready", flush=True)
for i in range(ITERS):
    for a, b in zip(first, step()):
        if not np.array_equal(a, b):
            print(f"gradients changed at iteration {i}", flush=True)
            sys.exit(3)
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the storm outlives the loop
print(f"ok hits={hits[0]}", flush=True)
"""


def _env(threads: int) -> dict:
    return dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                GLOG_minloglevel="2",
                PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))


@pytest.mark.parametrize("threads", [1, 2])
def test_gemms_under_a_signal_storm_keep_the_heap_and_the_numbers(threads):
    code = STORM_CHILD.replace("ITERS", "300")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=_env(threads),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        head = []
        while not head or head[-1] not in ("ready\n", ""):  # past Paddle's start-up warnings
            head.append(proc.stdout.readline())
        assert head[-1] == "ready\n", "".join(head)[-3000:]
        deadline = time.monotonic() + 90  # ~2 s when healthy; a corrupted heap can deadlock malloc
        while proc.poll() is None and time.monotonic() < deadline:
            os.kill(proc.pid, signal.SIGTERM)
            time.sleep(0.001)
        hung = proc.poll() is None
    finally:
        if proc.poll() is None:
            proc.kill()
    out = proc.communicate()[0]
    assert not hung, f"still running after 90 s of the storm (a deadlocked malloc?):\n{out[-3000:]}"
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{out[-3000:]}"
    hits = int(out.strip().rsplit("hits=", 1)[1])
    assert hits >= 100, out  # the storm really reached the process's handler


MASKS_CHILD = r"""
import os, signal
import paddle
from paddle_semoe import ops

def holding_sigterm():
    bit = 1 << (signal.SIGTERM - 1)
    tids = []
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/status") as fh:
            blk = next(ln for ln in fh if ln.startswith("SigBlk:"))
        if int(blk.split()[1], 16) & bit:
            tids.append(int(tid))
    return tids

before = holding_sigterm()
x, w = paddle.randn([512, 256]), paddle.randn([256, 256])
x.stop_gradient = False
ops.fused_linear(x, w, backend="custom").sum().backward()
after = holding_sigterm()
print(len(before), len(after), int(os.getpid() in after))
"""


def test_gemm_leaves_the_openmp_workers_holding_signals_and_the_caller_not():
    """oneDNN runs a GEMM called outside a parallel region on the caller's OpenMP team, whose
    workers the guard cannot reach per call: they block asynchronous signals for good, while
    the calling (Python main) thread gets its mask back after every GEMM."""
    proc = subprocess.run([sys.executable, "-c", MASKS_CHILD], cwd=ROOT, env=_env(3),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    before, after, main_holds = map(int, proc.stdout.split()[-3:])
    assert after >= before + 2, proc.stdout  # the two workers of a team of three
    assert main_holds == 0
