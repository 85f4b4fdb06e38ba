"""The lazy expert AdamW: one numpy implementation shared by resident and tiered experts.

Semantics (``optim.expert_update: lazy``; ``storage/README.md``): an expert that received no
tokens in a step (over its micro-batches and every rank routing to it) is not updated at all;
one that did gets the AdamW update below with the *global* step count ``t`` (bias correction
does not restart per expert, as in Paddle's ``lazy_mode`` for sparse rows).

For one expert tensor ``p`` with gradient ``g`` (already averaged like any gradient), clip
coefficient ``c`` (1 when no clipping happens), learning rate ``lr``, all float32::

    g' = g * c                         (only when c < 1)
    p  = p * (1 - lr * wd)             (decoupled weight decay, when the tensor decays)
    m  = b1 * m + (1 - b1) * g'
    v  = b2 * v + (1 - b2) * g' * g'
    p  = p - lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps * sqrt(1 - b2^t))

which is Paddle's AdamW formula. The resident and tiered paths run exactly this function on the
same float32 values, so their results are bit-identical. The update walks the arrays in chunks
that stay in the CPU cache (~0.5 G parameters/s on one core here).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

_CHUNK = 1 << 16  # floats per chunk: 256 KiB per operand, L2-resident temporaries


@dataclass(frozen=True)
class AdamWHyper:
    """AdamW constants of the expert update (from ``OptimConfig``)."""

    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.01

    def __post_init__(self) -> None:
        if not (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0):
            raise ValueError(f"beta1 and beta2 must be in [0, 1), got {self.beta1}, {self.beta2}")
        if self.eps <= 0 or self.weight_decay < 0:
            raise ValueError(f"eps must be > 0 and weight_decay >= 0, got {self.eps}, {self.weight_decay}")


@dataclass(frozen=True)
class StepScalars:
    """The float32 scalars of one optimizer step (computed once, used for every tensor)."""

    lr_t: np.float32
    eps_t: np.float32
    decay: np.float32
    b1: np.float32
    b2: np.float32
    c1: np.float32
    c2: np.float32
    grad_scale: np.float32 | None  # None: no clipping this step


def step_scalars(hyper: AdamWHyper, lr: float, t: int, grad_scale: float = 1.0) -> StepScalars:
    """Scalars of step ``t`` (1-based) at learning rate ``lr``; ``grad_scale`` < 1 clips."""
    if t < 1:
        raise ValueError(f"AdamW step count must be >= 1, got {t}")
    bc1 = 1.0 - hyper.beta1**t
    bc2 = 1.0 - hyper.beta2**t
    return StepScalars(
        lr_t=np.float32(lr * math.sqrt(bc2) / bc1),
        eps_t=np.float32(hyper.eps * math.sqrt(bc2)),
        decay=np.float32(1.0 - lr * hyper.weight_decay),
        b1=np.float32(hyper.beta1),
        b2=np.float32(hyper.beta2),
        c1=np.float32(1.0 - hyper.beta1),
        c2=np.float32(1.0 - hyper.beta2),
        grad_scale=np.float32(grad_scale) if grad_scale < 1.0 else None,
    )


def adamw_update_(
    p: np.ndarray, m: np.ndarray, v: np.ndarray, g: np.ndarray | None, s: StepScalars, *, decay: bool
) -> None:
    """Update one expert tensor in place.

    Args:
        p, m, v: float32 arrays of the same size (any shape, C-contiguous): weights, moments.
        g: float32 gradient of the same size, or None for an all-zero gradient.
        s: :func:`step_scalars` of this step.
        decay: apply the decoupled weight decay to this tensor.
    """
    pf, mf, vf = p.reshape(-1), m.reshape(-1), v.reshape(-1)
    n = pf.size
    if mf.size != n or vf.size != n or (g is not None and g.size != n):
        raise ValueError(f"adamw_update_: sizes differ: p {p.size}, m {m.size}, v {v.size}, g {None if g is None else g.size}")
    for a, what in ((pf, "p"), (mf, "m"), (vf, "v")):
        if a.dtype != np.float32:
            raise ValueError(f"adamw_update_: {what} must be float32, got {a.dtype}")
    gf = None if g is None else g.reshape(-1)
    t1 = np.empty(min(n, _CHUNK), dtype=np.float32)
    t2 = np.empty(min(n, _CHUNK), dtype=np.float32)
    for lo in range(0, n, _CHUNK):
        hi = min(lo + _CHUNK, n)
        k = hi - lo
        P, M, V, T, T2 = pf[lo:hi], mf[lo:hi], vf[lo:hi], t1[:k], t2[:k]
        if gf is None:
            T.fill(0.0)
        elif s.grad_scale is not None:
            np.multiply(gf[lo:hi], s.grad_scale, out=T)
        else:
            T[...] = gf[lo:hi]
        if decay:
            P *= s.decay
        M *= s.b1
        np.multiply(T, s.c1, out=T2)
        M += T2
        V *= s.b2
        np.multiply(T, T, out=T)
        T *= s.c2
        V += T
        np.sqrt(V, out=T)
        T += s.eps_t
        np.divide(M, T, out=T)
        T *= s.lr_t
        P -= T


def sq_sum(g: np.ndarray | None) -> float:
    """Sum of squares of a float32 gradient, accumulated in float64 in a fixed order
    (chunked pairwise sums; the result depends only on the values, not on the memory address)."""
    if g is None:
        return 0.0
    gf = g.reshape(-1)
    total = 0.0
    for lo in range(0, gf.size, _CHUNK):
        c = gf[lo : lo + _CHUNK].astype(np.float64)
        total += float(np.sum(c * c))
    return total
