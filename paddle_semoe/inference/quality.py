"""How much a serving variant (int8 expert sections) changes the model: held-out loss and
greedy-token agreement against a reference (float32) serving of the same package."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import paddle

from paddle_semoe.inference.package import Manifest
from paddle_semoe.inference.runner import InferenceModel, ServeConfig


@dataclass(frozen=True)
class QualityReport:
    """Attributes:
        loss_ref, loss_test: mean next-token cross-entropy (nats) on the held-out windows.
        token_agreement: share of greedy tokens equal to the reference's, position by position.
        first_divergence: per prompt, the first generated position that differs (-1: none).
        max_abs_logit_diff: largest logit difference on the held-out windows.
        tokens_scored: held-out tokens the losses average over.
    """

    loss_ref: float
    loss_test: float
    token_agreement: float
    first_divergence: tuple[int, ...]
    max_abs_logit_diff: float
    tokens_scored: int

    @property
    def loss_delta(self) -> float:
        return self.loss_test - self.loss_ref

    def to_dict(self) -> dict:
        return {**asdict(self), "loss_delta": self.loss_delta}


def _loss_and_logits(m: InferenceModel, windows: np.ndarray) -> tuple[float, np.ndarray]:
    """windows int64 [N, S+1] -> (mean cross-entropy of tokens 1..S given the prefix, logits [N, S, V])."""
    logits, _ = m.forward(paddle.to_tensor(windows[:, :-1]))
    z = logits.numpy().astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    tgt = windows[:, 1:]
    nll = -np.take_along_axis(logp, tgt[..., None], axis=-1)[..., 0]
    return float(nll.mean()), logits.numpy()


def compare_serving(manifest: Manifest, ref: ServeConfig, test: ServeConfig, held_out: np.ndarray, *,
                    seq_len: int, windows: int, prompts: np.ndarray, new_tokens: int, seed: int = 0) -> QualityReport:
    """Held-out loss on ``windows`` random windows of ``held_out`` (int token ids, 1-D) and greedy
    generation of ``new_tokens`` from ``prompts`` [B, P], under ``ref`` and ``test`` serving."""
    if held_out.ndim != 1 or held_out.size < seq_len + 2:
        raise ValueError(f"held-out tokens must be 1-D and longer than seq_len+1={seq_len + 1}, got shape {held_out.shape}")
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, held_out.size - seq_len - 1, windows)
    win = np.stack([held_out[s : s + seq_len + 1] for s in starts]).astype(np.int64)
    out = {}
    for name, serve in (("ref", ref), ("test", test)):
        m = InferenceModel.load(manifest, serve)
        try:
            loss, logits = _loss_and_logits(m, win)
            gen = m.generate(prompts.astype(np.int64), new_tokens).tokens[:, prompts.shape[1]:]
        finally:
            m.close()
        out[name] = (loss, logits, gen)
    (lr, zr, gr), (lt, zt, gt) = out["ref"], out["test"]
    same = gr == gt
    first = tuple(int(np.argmin(row)) if not row.all() else -1 for row in same)
    return QualityReport(lr, lt, float(same.mean()), first, float(np.abs(zr - zt).max()), int(win[:, 1:].size))
