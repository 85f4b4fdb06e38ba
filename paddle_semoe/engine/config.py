"""The training job's typed configuration (YAML schema of ``tools/train.py -c``).

Every section is a frozen dataclass validated in ``__post_init__``; the loader
(:mod:`paddle_semoe.config`) rejects unknown keys with the nearest valid one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from paddle_semoe.models.gpt import GPTConfig
from paddle_semoe.storage.config import StorageConfig

A2A_BACKENDS = ("auto", "nccl", "nccl_fused", "gloo", "gloo_pairwise", "gloo_allgather")
LR_SCHEDULES = ("cosine", "linear", "constant")
EXPERT_UPDATES = ("dense", "lazy")
AMP_DTYPES = ("bfloat16", "float16")
AMP_LEVELS = ("O1", "O2")
AMP_CPU_GEMMS = ("ffn", "all")  # CPU bfloat16: expert + dense FFN GEMMs only, or every compiled GEMM


def _require_finite(section: object, *names: str) -> None:
    """``ValueError`` naming the first of ``names`` whose value is NaN or infinite (``None`` passes)."""
    for name in names:
        value = getattr(section, name)
        if value is not None and not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value}")


def _require_choice(section: object, **choices: tuple[str, ...]) -> None:
    """``ValueError`` naming the first field (keyword) whose value is not among its choices."""
    for name, allowed in choices.items():
        value = getattr(section, name)
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


@dataclass(frozen=True)
class DatasetSpec:
    """One prepared dataset (``tools/prepare_data.py`` output) and its blending weight."""

    path: str
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("a data.datasets entry needs a path")
        if not math.isfinite(self.weight) or self.weight < 0:
            raise ValueError(f"weight of dataset {self.path} must be a finite number >= 0, got {self.weight}")


@dataclass(frozen=True)
class DataConfig:
    """Training data: the built-in ``corpus`` (byte tokens) unless ``datasets`` lists prepared
    datasets, which are then blended by weight (relative paths are relative to the working
    directory); ``val_fraction`` of each one's documents is held out. ``verify``: check every
    dataset file's SHA-256 against its manifest at start (``full``) or only sizes (``size``, for
    corpora so large that hashing them on every start is too slow)."""

    corpus: str = "python_docs"
    datasets: tuple[DatasetSpec, ...] = ()
    verify: Literal["full", "size"] = "full"
    val_fraction: float = 0.05
    seq_len: int = 128
    global_batch_size: int = 32  # sequences per optimizer step, summed over ranks and micro-steps

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 0.5:
            raise ValueError(f"val_fraction must be in (0, 0.5), got {self.val_fraction}")
        if self.seq_len <= 0 or self.global_batch_size <= 0:
            raise ValueError("seq_len and global_batch_size must be positive")
        if self.datasets and sum(d.weight for d in self.datasets) <= 0:
            raise ValueError(f"datasets weights sum to 0 ({[d.weight for d in self.datasets]}); give one a positive weight")


@dataclass(frozen=True)
class ParallelConfig:
    """Degrees of the hybrid-parallel job.

    ``dp_degree * sharding_degree`` must equal the world size (every rank holds different data;
    dense parameters are replicated over all ranks). ``ep_degree`` divides the world size:
    ranks ``[g*ep, (g+1)*ep)`` exchange tokens and each holds ``num_experts / ep`` experts.
    """

    dp_degree: int | None = None  # None: world_size / sharding_degree
    ep_degree: int = 1
    sharding_degree: int = 1
    sharding_stage: int = 1
    ranks_per_node: int | None = None  # None: the launcher's local world size
    hierarchical_a2a: bool = False
    a2a_backend: str = "auto"
    fused_grad_buckets: bool = True
    bucket_mb: float | None = None  # None: 4 MiB on CPU (measured best for Gloo), 256 MiB on GPU
    comm_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        _require_finite(self, "bucket_mb", "comm_timeout_s")
        for name in ("ep_degree", "sharding_degree", "dp_degree"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.sharding_stage not in (1, 2, 3):
            raise ValueError(f"sharding_stage must be 1, 2 or 3, got {self.sharding_stage}")
        _require_choice(self, a2a_backend=A2A_BACKENDS)
        if (self.bucket_mb is not None and self.bucket_mb <= 0) or self.comm_timeout_s <= 0:
            raise ValueError("bucket_mb and comm_timeout_s must be positive")
        if self.ranks_per_node is not None and self.ranks_per_node < 1:
            raise ValueError(f"ranks_per_node must be >= 1, got {self.ranks_per_node}")
        if self.dp_degree is not None and (self.dp_degree * self.sharding_degree) % self.ep_degree:
            raise ValueError(
                f"ep_degree={self.ep_degree} must divide the world size dp_degree x sharding_degree = "
                f"{self.dp_degree} x {self.sharding_degree}"
            )

    def smallest_world_size(self) -> int:
        """The fewest ranks these degrees run on: ``dp_degree x sharding_degree`` when dp_degree is
        set, else the least common multiple of ep_degree, sharding_degree and ranks_per_node."""
        if self.dp_degree is not None:
            return self.dp_degree * self.sharding_degree
        return math.lcm(self.ep_degree, self.sharding_degree, self.ranks_per_node or 1)

    def resolve(self, world_size: int) -> "ParallelConfig":
        """Check the degrees against the world size; fill ``dp_degree``."""
        dp = self.dp_degree if self.dp_degree is not None else world_size // self.sharding_degree
        if dp * self.sharding_degree != world_size:
            raise ValueError(
                f"parallel degrees do not multiply to the world size: dp_degree={dp} x "
                f"sharding_degree={self.sharding_degree} = {dp * self.sharding_degree}, "
                f"but {world_size} processes were launched"
            )
        if world_size % self.ep_degree:
            raise ValueError(f"ep_degree={self.ep_degree} must divide the world size {world_size}")
        return ParallelConfig(**{**self.__dict__, "dp_degree": dp})


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    schedule: str = "cosine"
    warmup_steps: int = 20
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # global-norm clip; 0 disables
    grad_accum_steps: int = 1
    # "dense": Paddle AdamW updates every expert every step; "lazy": an expert that received no
    # tokens in a step is not updated that step (paddle_semoe.storage.adamw; needed by storage)
    expert_update: str = "dense"

    def __post_init__(self) -> None:
        _require_finite(self, "lr", "min_lr_ratio", "weight_decay", "beta1", "beta2", "eps", "grad_clip")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.eps <= 0:
            raise ValueError(f"eps must be positive, got {self.eps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        _require_choice(self, schedule=LR_SCHEDULES)
        if self.warmup_steps < 0 or self.grad_accum_steps < 1 or self.grad_clip < 0:
            raise ValueError("warmup_steps >= 0, grad_accum_steps >= 1 and grad_clip >= 0 required")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError("beta1 and beta2 must be in [0, 1)")
        _require_choice(self, expert_update=EXPERT_UPDATES)


@dataclass(frozen=True)
class AmpConfig:
    """Mixed precision. GPU: Paddle autocast (``level`` O1/O2), float16 with a loss scaler.
    CPU (``dtype: bfloat16``, ``level: O1`` only): the compiled ops' GEMMs take bfloat16 operands
    (AVX512-BF16 / AMX through oneDNN) with float32 accumulation, while parameters (the master
    weights), gradients and AdamW states stay float32; ``cpu_gemms`` picks which GEMMs: ``ffn``
    (expert and dense FFN GEMMs, nearly all the FLOPs) or ``all`` (also the attention projections
    and the tied head). ``cpu_gemms`` is ignored on GPU."""

    enabled: bool = False
    dtype: str = "bfloat16"
    level: str = "O1"
    cpu_gemms: str = "ffn"

    def __post_init__(self) -> None:
        _require_choice(self, dtype=AMP_DTYPES, level=AMP_LEVELS, cpu_gemms=AMP_CPU_GEMMS)


@dataclass(frozen=True)
class RunConfig:
    max_steps: int = 200
    seed: int = 42
    output_dir: str = "outputs/run"
    log_every: int = 10
    eval_every: int = 50
    eval_batches: int = 8
    save_every: int = 100  # 0: only the final checkpoint
    keep_checkpoints: int = 2
    # "auto", "auto_verified" (see paddle_semoe.io.checkpoint.resolve_checkpoint), a checkpoint
    # path, or None
    resume: str | None = None
    recompute_experts: bool = False
    nan_skip_limit: int = 5  # non-finite steps tolerated before stopping

    def __post_init__(self) -> None:
        if self.max_steps <= 0:
            raise ValueError(f"max_steps must be positive, got {self.max_steps}")
        for name in ("log_every", "eval_every", "eval_batches"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.save_every < 0 or self.keep_checkpoints < 1 or self.nan_skip_limit < 0:
            raise ValueError("save_every >= 0, keep_checkpoints >= 1 and nan_skip_limit >= 0 required")


@dataclass(frozen=True)
class MonitorConfig:
    visualdl: bool = True
    logdir: str | None = None  # default: <output_dir>/vdl
    expert_histograms: bool = True


@dataclass(frozen=True)
class TrainConfig:
    model: GPTConfig = field(default_factory=GPTConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    amp: AmpConfig = field(default_factory=AmpConfig)
    train: RunConfig = field(default_factory=RunConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)

    def __post_init__(self) -> None:
        if self.storage.enabled and self.optim.expert_update != "lazy":
            raise ValueError(
                "storage.enabled=true needs optim.expert_update=lazy (a tiered store only touches the experts a "
                "step activates; the dense update changes every expert every step)"
            )
        if self.storage.enabled and self.model.moe_every == 0:
            raise ValueError("storage.enabled=true needs an MoE model (model.moe_every > 0)")
        if self.storage.shard_dense and (self.amp.enabled or self.parallel.sharding_stage != 1):
            raise ValueError(
                "storage.shard_dense=true shards the dense parameters itself over the sharding group: it needs "
                "parallel.sharding_stage=1 and amp.enabled=false"
            )
        if self.storage.enabled and self.amp.enabled:
            raise ValueError("storage.enabled=true keeps fp32 expert states on the host and does not support amp.enabled=true")
        ep = self.parallel.ep_degree
        if self.model.partition_embedding and self.model.d_model % ep:
            raise ValueError(
                f"model.partition_embedding=true splits model.d_model={self.model.d_model} over "
                f"parallel.ep_degree={ep}: d_model must be divisible by it"
            )
        if self.parallel.sharding_stage > 1 and self.parallel.sharding_degree > 1 and self.model.moe_every > 0:
            raise ValueError(
                "parallel.sharding_stage 2/3 shards every parameter over the sharding group, but expert "
                "parameters are owned per rank and must not be sharded: use sharding_stage=1 for MoE models"
            )
        if self.model.moe_every > 0 and self.model.moe.num_experts % self.parallel.ep_degree:
            raise ValueError(
                f"model.moe.num_experts={self.model.moe.num_experts} must be divisible by "
                f"parallel.ep_degree={self.parallel.ep_degree}"
            )
        if self.data.seq_len > self.model.max_seq_len:
            raise ValueError(f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}")
        least = self.parallel.smallest_world_size() * self.optim.grad_accum_steps  # every world is a multiple
        if self.data.global_batch_size % least:
            raise ValueError(
                f"data.global_batch_size={self.data.global_batch_size} cannot be split evenly over any world these "
                f"degrees allow: it must be a multiple of {self.parallel.smallest_world_size()} ranks x "
                f"optim.grad_accum_steps={self.optim.grad_accum_steps}"
            )

    def resolve_parallel(self, world_size: int) -> ParallelConfig:
        """The parallel degrees on ``world_size`` ranks (``dp_degree`` filled in); ``ValueError``
        naming the problem when the job cannot run on that many (degrees, batch split)."""
        par = self.parallel.resolve(world_size)
        per_step = world_size * self.optim.grad_accum_steps
        if self.data.global_batch_size % per_step:
            raise ValueError(
                f"data.global_batch_size={self.data.global_batch_size} must be divisible by "
                f"world_size x optim.grad_accum_steps = {world_size} x {self.optim.grad_accum_steps}"
            )
        return par
