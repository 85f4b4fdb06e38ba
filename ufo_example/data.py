"""Four image tasks built from real offline images: scikit-learn's bundled digits.

``load_digits`` (8x8 grey images of handwritten digits, 1797 of them) ships inside the
scikit-learn wheel; nothing is downloaded at run time. The file is read straight from the
installed package (``sklearn/datasets/data/digits.csv.gz``) without importing scikit-learn
(its import costs every worker about a second); if that file is not where expected,
``sklearn.datasets.load_digits`` is called. ``source: synthetic`` makes deterministic
digit-like images from numpy alone (tests on machines without scikit-learn).

Task kinds (labels of one image):

* ``digit``: the digit, 10 classes;
* ``parity``: even / odd, 2 classes;
* ``ge5``: digit >= 5, 2 classes;
* ``rotation``: the image is rotated by k x 90 degrees (k fixed per image), predict k: 4 classes.

Split: a fixed permutation (``split_seed``) puts ``val_fraction`` of the images in the held-out
set; every task uses the same split. Training order: task ``t`` walks its own permutation of
the training images per pass, seeded by ``(seed, t, pass)``; the samples of ``step`` are
positions ``[step*B, (step+1)*B)`` of that endless stream, so any step's batch is a pure
function of ``(seed, task, step)`` (exact resume after a restart or a resize).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["DIGIT_TASK_KINDS", "DataConfig", "DigitsTasks", "load_digit_images"]

#: kind -> number of classes
DIGIT_TASK_KINDS: dict[str, int] = {"digit": 10, "parity": 2, "ge5": 2, "rotation": 4}
SOURCES = ("digits", "synthetic")


@dataclass(frozen=True)
class DataConfig:
    """YAML section ``data``."""

    source: str = "digits"
    image_size: int = 8  # 8 = native; a multiple of 8 upsamples (nearest) for bigger models
    val_fraction: float = 0.2
    split_seed: int = 0

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {self.source!r}")
        if self.image_size < 8 or self.image_size % 8:
            raise ValueError(f"image_size must be a multiple of 8, got {self.image_size}")
        if not 0.0 < self.val_fraction < 0.5:
            raise ValueError(f"val_fraction must be in (0, 0.5), got {self.val_fraction}")


def _digits_file() -> Path | None:
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "digits.csv.gz"
    return path if path.exists() else None


@lru_cache(maxsize=2)
def load_digit_images(source: str = "digits") -> tuple[np.ndarray, np.ndarray]:
    """(images float32 [N, 8, 8] in [0, 1], labels int64 [N])."""
    if source == "synthetic":
        rng = np.random.default_rng(12345)
        protos = (rng.random((10, 8, 8)) > 0.55).astype(np.float32)
        labels = np.arange(600, dtype=np.int64) % 10
        noise = rng.normal(0.0, 0.25, size=(600, 8, 8)).astype(np.float32)
        return np.clip(protos[labels] + noise, 0.0, 1.0), labels
    path = _digits_file()
    if path is not None:
        with gzip.open(path, "rt") as fh:
            data = np.loadtxt(fh, delimiter=",", dtype=np.float64)
        images, labels = data[:, :-1], data[:, -1].astype(np.int64)
    else:
        try:
            from sklearn.datasets import load_digits
        except ImportError as exc:
            raise RuntimeError(
                "the digits images come with scikit-learn: run `bash ufo_example/setup.sh` "
                "(pip install scikit-learn), or set data.source=synthetic"
            ) from exc
        images, labels = load_digits(return_X_y=True)
    if images.shape != (1797, 64):
        raise RuntimeError(f"unexpected digits data shape {images.shape} (expected 1797 x 64) from {path}")
    return (images.reshape(-1, 8, 8) / 16.0).astype(np.float32), labels.astype(np.int64)


class DigitsTasks:
    """The train / held-out images and the labels of every task kind.

    Args:
        cfg: the data section.
        kinds: task kind of each task (by task index).
        seed: the training-order seed.
    """

    def __init__(self, cfg: DataConfig, kinds: list[str] | tuple[str, ...], seed: int) -> None:
        for k in kinds:
            if k not in DIGIT_TASK_KINDS:
                raise ValueError(f"unknown task kind {k!r}; expected one of {sorted(DIGIT_TASK_KINDS)}")
        self.cfg = cfg
        self.kinds = tuple(kinds)
        self.seed = seed
        images, labels = load_digit_images(cfg.source)
        n = len(labels)
        perm = np.random.default_rng(cfg.split_seed).permutation(n)
        n_val = int(round(cfg.val_fraction * n))
        self.val_idx, self.train_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
        self.images, self.labels = images, labels
        self.rot = np.random.default_rng([cfg.split_seed, 77]).integers(0, 4, size=n)
        self.sha256 = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()
        self._perm_cache: dict[tuple[int, int], np.ndarray] = {}
        logger.info("data: %s, %d train / %d held-out images, sha256 %s...", cfg.source, len(self.train_idx), len(self.val_idx), self.sha256[:12])

    @property
    def n_train(self) -> int:
        return len(self.train_idx)

    def num_classes(self, task: int) -> int:
        return DIGIT_TASK_KINDS[self.kinds[task]]

    def _perm(self, task: int, epoch: int) -> np.ndarray:
        key = (task, epoch)
        if key not in self._perm_cache:
            if len(self._perm_cache) > 16:
                self._perm_cache.clear()
            self._perm_cache[key] = np.random.default_rng([self.seed, task, epoch]).permutation(self.n_train)
        return self._perm_cache[key]

    def stream_positions(self, task: int, first: int, count: int) -> np.ndarray:
        """Image indices (into the whole set) at stream positions ``[first, first + count)``."""
        pos = np.arange(first, first + count, dtype=np.int64)
        out = np.empty(count, dtype=np.int64)
        for epoch in np.unique(pos // self.n_train):
            m = pos // self.n_train == epoch
            out[m] = self.train_idx[self._perm(task, int(epoch))[pos[m] % self.n_train]]
        return out

    def samples(self, task: int, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(x float32 [n, 1, S, S], y int64 [n]) of images ``idx`` for ``task``."""
        kind = self.kinds[task]
        img = self.images[idx]
        y = self.labels[idx]
        if kind == "parity":
            y = y % 2
        elif kind == "ge5":
            y = (y >= 5).astype(np.int64)
        elif kind == "rotation":
            k = self.rot[idx]
            img = np.stack([np.rot90(im, int(r)) for im, r in zip(img, k)]) if len(idx) else img
            y = k.astype(np.int64)
        scale = self.cfg.image_size // 8
        if scale > 1:
            img = np.kron(img, np.ones((1, scale, scale), dtype=np.float32))
        return np.ascontiguousarray(img[:, None], dtype=np.float32), np.ascontiguousarray(y, dtype=np.int64)

    def train_batch(self, task: int, step: int, batch_size: int, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Samples ``[start, start+count)`` of the task's global batch of ``step``."""
        return self.samples(task, self.stream_positions(task, step * batch_size + start, count))

    def held_out(self, task: int) -> tuple[np.ndarray, np.ndarray]:
        return self.samples(task, self.val_idx)
