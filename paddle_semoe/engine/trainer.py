"""The training loop: data, model, optimizer, gradient sync, clipping, eval, checkpoints, logs.

One optimizer step:

1. ``grad_accum_steps`` micro-batches forward/backward (loss / accum);
2. gradients reduced per parameter class in fused buckets (:mod:`paddle_semoe.comm.fusion`);
3. MoE-aware global-norm clipping; a non-finite loss or norm on any rank skips the step on
   every rank (counted; the job stops with :class:`TrainingError` past the limit);
4. AdamW step (dense: optionally ZeRO-1 sharded; experts: local), learning rate from the
   step number (a pure function, so a resumed run continues the schedule exactly).

With ``optim.expert_update: lazy`` the experts that received no tokens are left untouched
(:mod:`paddle_semoe.storage.lazy`); with ``storage.enabled`` their states live in the tiered
store (:class:`paddle_semoe.storage.tiered.TieredExperts`) instead of resident parameters.
"""

from __future__ import annotations

import logging
import math
import signal
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import paddle

from paddle_semoe.comm import ExpertExchange, GradientReducer, global_grad_norm, reduce_gradients_unfused
from paddle_semoe.comm.nccl_fused import FusedNcclExchange
from paddle_semoe.comm.transport import make_communicator
from paddle_semoe.config import dump_yaml, to_dict
from paddle_semoe.data import check_tokenizer_on_resume, copy_tokenizer_files, load_training_split, val_batches
from paddle_semoe.engine.checkpoint import TrainingError, write_checkpoint
from paddle_semoe.engine.amp import autocast, configure_cpu_gemms, scaler_for
from paddle_semoe.engine.config import TrainConfig
from paddle_semoe.engine.distributed import DistContext
from paddle_semoe.engine.metrics import MetricsLogger, Progress, format_eta, peak_rss_bytes
from paddle_semoe.engine.optim import MoEOptimizer, lr_at, scale_grads_
from paddle_semoe.engine.preempt import Preempted, StopRequest
from paddle_semoe.io.checkpoint import (
    AUTO, AUTO_VERIFIED, LATEST, CheckpointError, read_manifest, remove_partial, resolve_checkpoint, save_shard, shard_name,
)
from paddle_semoe.io.model_state import ExpertLayout, collect_rank_state, restore_rank_state
from paddle_semoe.models.gpt import ExpertParallel, GPTMoE
from paddle_semoe.moe.experts import GroupedExperts, deferred_expert_weights
from paddle_semoe.moe.monitor import balance_biases, routing_scalars
from paddle_semoe.moe.routers import update_balance_biases
from paddle_semoe.storage.adamw import AdamWHyper
from paddle_semoe.storage.dense_shard import build_sharded_dense
from paddle_semoe.storage.lazy import clip_grad_norm_lazy_
from paddle_semoe.storage.tiered import build_tiered_experts, expected_index_names

logger = logging.getLogger(__name__)


class StepSums(NamedTuple):
    """One step's micro-batch statistics on this rank, still on the device (reading them syncs).

    The losses are means over the micro-batches, accumulated in float64 exactly as the host
    would (each float32 value widened, divided by the micro-batch count, added in order).
    """

    loss: paddle.Tensor  # [] float64: total loss (lm + aux)
    lm_loss: paddle.Tensor  # [] float64
    aux_loss: paddle.Tensor  # [] float64
    demand: list[paddle.Tensor]  # per MoE layer: [E] int64 routing choices per expert, summed
    dropped: paddle.Tensor  # [] float64: dropped fraction, mean over micro-batches and MoE layers
    dropped_by_choice: list[paddle.Tensor]  # per MoE layer: [K] float64 dropped share per choice rank (micro-batch mean)


class StepResult(NamedTuple):
    """One optimizer step on this rank: ``loss``, ``grad_norm`` and ``skipped`` were decisions,
    so they are host values; ``sums`` stays on the device until a log step reads it."""

    sums: StepSums
    loss: float
    grad_norm: float
    skipped: bool


def _add_at(sums: list[paddle.Tensor], i: int, value: paddle.Tensor) -> None:
    """``sums[i] += value`` over micro-batches (the first one appends)."""
    if i == len(sums):
        sums.append(value)
    else:
        sums[i] = sums[i] + value


def expert_init_value(seed: int, layer_idx: int, g: int, pname: str, shape: tuple, std: float) -> np.ndarray:
    """Initial value of one expert tensor (``w1``/``w2``: normal; ``b1``/``b2``: zero) from
    (seed, MoE layer, global expert index) alone."""
    if pname not in ("w1", "w2"):
        return np.zeros(shape, dtype=np.float32)
    rng = np.random.default_rng([seed, layer_idx, g, 1 if pname == "w1" else 2])
    return rng.standard_normal(shape).astype(np.float32) * std


def init_experts_by_global_index(model: paddle.nn.Layer, seed: int, layout: ExpertLayout, std: float) -> None:
    """Initialize expert weights from (seed, layer, global expert index) alone, so a model built
    with any expert-parallel degree holds exactly the same experts."""
    experts = [sub for _, sub in model.named_sublayers() if isinstance(sub, GroupedExperts)]
    for layer_idx, sub in enumerate(experts):
        for pname in ("w1", "w2"):
            p = getattr(sub, pname)
            p.set_value(np.stack([
                expert_init_value(seed, layer_idx, layout.offset + local, pname, tuple(p.shape[1:]), std)
                for local in range(layout.num_local)
            ]))


class Trainer:
    def __init__(self, cfg: TrainConfig, ctx: DistContext):
        self.cfg = cfg
        self.ctx = ctx
        self.topology = ctx.topology
        par = ctx.parallel
        self.output_dir = Path(cfg.train.output_dir)
        self.ckpt_root = self.output_dir / "checkpoints"
        mcfg = cfg.model
        ep = par.ep_degree
        self.layout = ExpertLayout(ep, self.topology.ep_rank if ep > 1 else 0, mcfg.moe.num_experts)

        # data: the global batch is split over all ranks and micro-steps (checked by
        # TrainConfig.resolve_parallel); the built-in corpus or data.datasets, blended by weight
        self.split = load_training_split(
            cfg.data.corpus, cfg.data.val_fraction, [(d.path, d.weight) for d in cfg.data.datasets], mcfg.vocab_size,
            verify=cfg.data.verify,
        )
        self.unigram_baseline = self.split.unigram_baseline(mcfg.vocab_size)
        self.batcher = self.split.batcher(
            cfg.data.global_batch_size, cfg.data.seq_len, seed=cfg.train.seed, rank=ctx.rank, world_size=ctx.world_size
        )

        # model: dense weights identical on every rank (same seed); experts by global index
        paddle.seed(cfg.train.seed)
        backend = "nccl" if par.a2a_backend == "nccl_fused" else par.a2a_backend  # collectives of the fused path
        self.comm = None if ctx.world_size == 1 else make_communicator(backend, rank=ctx.rank, timeout_s=par.comm_timeout_s)
        parallel = None  # the model gets its EP group, exchange and communicator explicitly
        if ep > 1:
            n_local, hier = mcfg.moe.num_experts // ep, par.hierarchical_a2a
            exchange: FusedNcclExchange | ExpertExchange
            if par.a2a_backend == "nccl_fused":  # rows through the fused op; self.comm (NCCL) for the rest
                exchange = FusedNcclExchange(self.topology, n_local, hierarchical=hier,
                                             timeout_s=par.comm_timeout_s)
            else:
                exchange = ExpertExchange(self.topology, n_local, communicator=self.comm,
                                          hierarchical=hier)
            parallel = ExpertParallel(self.topology.ep_group, exchange, self.comm)
        with deferred_expert_weights(cfg.storage.enabled):  # tiered: no expert stack is ever allocated
            self.model = GPTMoE(mcfg, parallel, recompute_moe=cfg.train.recompute_experts)
        self.tiered = None
        if cfg.storage.enabled:
            self.tiered = build_tiered_experts(cfg, self.model, self.layout, ctx.rank, ctx.world_size)
        else:
            init_experts_by_global_index(self.model, cfg.train.seed, self.layout, mcfg.init_std)
        sharded_dense = None
        if cfg.storage.shard_dense:  # horizontal prefetch: dense shards gathered ahead of each block
            o = cfg.optim
            group = self.topology.sharding_group.ranks if self.topology.sharding_group is not None else (ctx.rank,)
            sharded_dense = build_sharded_dense(
                self.model, group, ctx.rank, AdamWHyper(o.beta1, o.beta2, o.eps, o.weight_decay), par.comm_timeout_s
            )
        paddle.seed(cfg.train.seed * 1_000_003 + 7919 * ctx.rank + 1)  # per-rank stream: dropout, gate noise
        self.optimizer = MoEOptimizer(
            self.model, cfg.optim, ctx.hcg if par.sharding_degree > 1 else None, lazy_experts=self.tiered,
            sharded_dense=sharded_dense,
        )
        if cfg.amp.enabled and cfg.amp.level == "O2":
            # parameters in low precision, fp32 master weights inside both optimizers
            self.model, opts = paddle.amp.decorate(
                models=self.model, optimizers=list(self.optimizer.optimizers()), level="O2", dtype=cfg.amp.dtype
            )
            self.optimizer.replace_optimizers(opts)
        self.scaler = scaler_for(cfg.amp)
        # CPU: bf16 GEMMs (float32 weights and states) under amp, else float32 (process-wide); None on GPU
        self.cpu_gemm_precision = configure_cpu_gemms(cfg.amp, backend=mcfg.ops_backend)
        if self.cpu_gemm_precision is not None and ctx.is_main:
            logger.info("CPU GEMM precision: %s", self.cpu_gemm_precision)
        self.params = [p for p in self.model.parameters() if not p.stop_gradient]
        self.reducer = None
        if ctx.world_size > 1 and par.fused_grad_buckets:
            bucket = int(par.bucket_mb * (1 << 20)) if par.bucket_mb is not None else None
            self.reducer = GradientReducer(self.params, self.topology, self.comm, bucket)

        # host collectives of the loop (NaN check, metrics, checkpoints) over all ranks, under the watchdog
        self.coll = self.comm or make_communicator("gloo", rank=ctx.rank)
        self.world = self.topology.dp_group
        self.step = 0
        self.resumed_from: Path | None = None  # kept by pruning until a newer checkpoint verifies
        self.nan_skips = 0
        self.tokens_seen = 0
        self._lazy_kept: list[np.ndarray] = []  # lazy expert update: rows kept per global expert, this step
        self.metrics = MetricsLogger(
            self.output_dir,
            Path(cfg.monitor.logdir or self.output_dir / "vdl") if cfg.monitor.visualdl else None,
            enabled=ctx.is_main,
        )
        # SIGTERM/SIGINT -> checkpoint and Preempted at a step boundary (install on every rank or none)
        self.stop_request: StopRequest | None = None

    # ------------------------------------------------------------------ collectives
    def _all_reduce(self, values: Any, op: str = "sum", what: str | None = None) -> np.ndarray:
        """float64 sum / max of host values over all ranks (:meth:`Communicator.all_reduce`)."""
        return self.coll.all_reduce(np.asarray(values, dtype=np.float64), self.world, op, what)

    def _sum_arrays(self, arrays: list[np.ndarray], what: str | None = None) -> list[np.ndarray]:
        """Element-wise sums over all ranks of a list of arrays, flattened to float64 (one
        all-reduce); the arrays themselves on a single rank."""
        if self.ctx.world_size == 1 or not arrays:
            return arrays
        flat = self._all_reduce(np.concatenate([np.ravel(a) for a in arrays]), what=what)
        return np.split(flat, np.cumsum([a.size for a in arrays])[:-1])

    def _sum_tensor_over_ranks(self, t: paddle.Tensor) -> None:
        """In place: ``t`` = its sum over all ranks (the aux-free routers' expert loads)."""
        if self.ctx.world_size > 1:
            t.set_value(paddle.to_tensor(self._all_reduce(t.numpy(), what="expert load").astype("float32")))

    def _any_rank_bad(self, loss: float, grad_norm: float) -> bool:
        """The non-finite step check: True on every rank when any rank saw a non-finite value."""
        bad = 0.0 if (math.isfinite(loss) and math.isfinite(grad_norm)) else 1.0
        return bool(self._all_reduce([bad], "max", "non-finite step check")[0] > 0)

    # ------------------------------------------------------------------ training
    def _micro_batches(self, batch: np.ndarray) -> list[tuple[paddle.Tensor, paddle.Tensor]]:
        parts = np.array_split(batch, self.cfg.optim.grad_accum_steps)
        return [(paddle.to_tensor(p[:, :-1]), paddle.to_tensor(p[:, 1:])) for p in parts]

    def _ensure_experts(self) -> None:
        """Tiered storage: write the initial expert states unless a checkpoint provided them."""
        if self.tiered is not None and not self.tiered.initialized:
            seed, std = self.cfg.train.seed, self.cfg.model.init_std
            self.tiered.initialize(lambda layer, g, name, shape: expert_init_value(seed, layer, g, name, shape, std))

    def _lazy_activity(self, kept: list[np.ndarray]) -> list[np.ndarray]:
        """Rows kept per local expert, summed over micro-batches and ranks (lazy update)."""
        lo, hi = self.layout.offset, self.layout.offset + self.layout.num_local
        return [np.asarray(k)[lo:hi] for k in self._sum_arrays(kept)]

    def accumulate_gradients(self, batch: np.ndarray) -> StepSums:
        """Forward/backward over the micro-batches of ``batch`` and the gradient reduction.

        Leaves synchronized, unscaled gradients in ``.grad``. The statistics stay on the device
        (no per-micro-batch sync); only the lazy expert update's kept rows per local expert are
        read, once per step, into ``self._lazy_kept`` (the update's decision needs them).
        """
        cfg = self.cfg
        self._ensure_experts()
        self.model.train()
        accum = cfg.optim.grad_accum_steps
        lazy = self.optimizer.lazy
        zero = paddle.zeros([], dtype="float64")
        loss_sum, lm_sum, aux_sum, dropped = zero, zero, zero, zero
        demand: list[paddle.Tensor] = []
        by_choice: list[paddle.Tensor] = []
        kept: list[paddle.Tensor] = []
        scale = self.scaler.scale if self.scaler is not None else 1.0
        for x, y in self._micro_batches(batch):
            with autocast(cfg.amp):
                out = self.model(x, y)
            (out.loss * (scale / accum)).backward()
            if lazy is not None:
                lazy.after_backward()
            loss_sum = loss_sum + out.loss.detach().astype("float64") / accum
            lm_sum = lm_sum + out.lm_loss.detach().astype("float64") / accum
            aux_sum = aux_sum + out.aux_loss.detach().astype("float64") / accum
            for i, s in enumerate(out.moe_stats):
                _add_at(demand, i, s.demand.astype("int64"))
                if lazy is not None:
                    _add_at(kept, i, s.kept.astype("int64"))
                frac = s.dropped_fraction.detach().astype("float64") / (accum * max(len(out.moe_stats), 1))
                dropped = dropped + frac
                if s.dropped_by_choice is not None:  # (None under activation recomputation)
                    _add_at(by_choice, i, s.dropped_by_choice.detach().astype("float64") / accum)
        self._lazy_kept = [k.numpy() for k in kept]  # empty without the lazy update

        if self.reducer is not None:
            self.reducer.reduce()
        elif self.ctx.world_size > 1:
            reduce_gradients_unfused(self.params, self.topology, self.comm)
        scale_grads_(self.params, 1.0 / scale)  # the loss scale
        return StepSums(loss_sum, lm_sum, aux_sum, demand, dropped, by_choice)

    def train_step(self, batch: np.ndarray) -> StepResult:
        cfg = self.cfg
        sums = self.accumulate_gradients(batch)
        loss_sum = float(sums.loss)  # the step's one read of its statistics: the non-finite check needs it

        # global norm (MoE-aware) for logging and clipping
        max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf
        expert_coef = clip_coef = 1.0
        lazy = self.optimizer.lazy
        if lazy is not None:
            lazy.set_active(self._lazy_activity(self._lazy_kept))
            grad_norm, expert_coef = clip_grad_norm_lazy_(self.params, lazy, max_norm, self.topology, self.coll)
        else:  # the clip coefficient is folded into the AdamW kernel (no pass over the gradients)
            grad_norm, clip_coef = global_grad_norm(self.params, max_norm, self.topology, self.coll)
        skipped = self._any_rank_bad(loss_sum, grad_norm)
        if self.scaler is not None:
            self.scaler.update(found_inf=skipped)
        if skipped and self.scaler is not None and not self.scaler.at_minimum and math.isfinite(loss_sum):
            logger.info("step %d: fp16 gradients overflowed; step skipped, loss scale -> %g", self.step, self.scaler.scale)
        elif skipped:
            self.nan_skips += 1
            logger.warning(
                "step %d: non-finite loss %.4g or grad norm %.4g: step skipped (%d/%d allowed)",
                self.step, loss_sum, grad_norm, self.nan_skips, cfg.train.nan_skip_limit,
            )
            if self.nan_skips > cfg.train.nan_skip_limit:
                raise TrainingError(
                    f"{self.nan_skips} non-finite steps (limit train.nan_skip_limit={cfg.train.nan_skip_limit}); "
                    f"last at step {self.step}: loss={loss_sum}, grad_norm={grad_norm}. Lower optim.lr or check the data."
                )
        if skipped and lazy is not None:
            lazy.discard()
        if not skipped:
            self.optimizer.step(expert_grad_scale=expert_coef, grad_scale=clip_coef)
            # aux-loss-free routers: bias += rate * sign(mean - load), load summed over all ranks
            update_balance_biases(self.model, self._sum_tensor_over_ranks)
        self.optimizer.clear_grad()
        return StepResult(sums, loss_sum, grad_norm, skipped)

    @paddle.no_grad()
    def evaluate(self, tokens: Any = None) -> float:
        """Mean token cross-entropy (nats) on the held-out split, or on ``tokens`` (``int64[N]``,
        e.g. a user's text encoded with the model's tokenizer: every full window is scored, and a
        last partial batch too on a single rank). All ranks see equal batch counts."""
        cfg = self.cfg
        self._ensure_experts()
        self.model.eval()
        per_rank = max(cfg.data.global_batch_size // self.ctx.world_size, 1)
        total = count = 0.0
        single = self.ctx.world_size == 1
        for batch in val_batches(
            self.split.val if tokens is None else tokens, per_rank, cfg.data.seq_len,
            max_batches=cfg.train.eval_batches if tokens is None else None,
            rank=self.ctx.rank, world_size=self.ctx.world_size, drop_last=tokens is None or not single,
        ):
            x, y = paddle.to_tensor(batch[:, :-1]), paddle.to_tensor(batch[:, 1:])
            out = self.model(x, y)
            n = float(y.size)
            total += float(out.lm_loss) * n
            count += n
        total, count = self._all_reduce([total, count])
        self.model.train()
        return total / max(count, 1.0)

    # ------------------------------------------------------------------ checkpoints
    def _progress(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "seed": self.cfg.train.seed,
            "data": self.batcher.state_dict(),
            "nan_skips": self.nan_skips,
            "tokens_seen": self.tokens_seen,
            "corpus_sha256": self.split.sha256,
            "tokenizer": self.split.tokenizer_identity(),
            "loss_scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }

    def save_checkpoint(self) -> Path:
        """Collective: every rank writes its shard (and SSD-tier index); rank 0 the manifest."""

        def write_files(tmp: Path) -> list:
            self.optimizer.sync_params()
            tensors, meta = collect_rank_state(self.model, self.optimizer, self.layout, self.ctx.rank, self._progress())
            records = [save_shard(tmp / shard_name(self.ctx.rank), tensors, meta)]
            if self.ctx.is_main:  # the tokenizer travels with the model (prepared datasets; none for bytes)
                records += copy_tokenizer_files(tmp, self.split.tokenizer_files())
            if self.tiered is not None:  # the SSD tier: hard links + one checksummed index per rank
                records.append(self.tiered.save_checkpoint(tmp, self.ctx.rank))
            return records

        meta = {
            "ep_degree": self.layout.ep_degree,
            "num_experts": self.layout.num_experts,
            "sharded_dense_optimizer": self.optimizer.sharded is not None,
            "expert_storage": self.tiered is not None,
            "model": to_dict(self.cfg.model),
        }
        return write_checkpoint(
            self.ckpt_root, self.step, self.coll, self.world, write_files=write_files, meta=meta,
            keep=self.cfg.train.keep_checkpoints, write_config=lambda path: dump_yaml(self.cfg, path),
            protect=self.resumed_from,
        )

    def resume(self, spec: str | None) -> bool:
        path = resolve_checkpoint(spec, self.ckpt_root)
        if path is None:
            return False
        try:
            manifest = read_manifest(path)
        except CheckpointError as exc:
            if spec != AUTO:
                raise
            raise CheckpointError(
                f"{exc}; to resume from the newest checkpoint that verifies instead, rerun with "
                f"-o train.resume={AUTO_VERIFIED}"
            ) from exc
        tiered_ckpt = bool(manifest.meta.get("expert_storage", False))
        if tiered_ckpt != (self.tiered is not None):
            raise CheckpointError(
                f"checkpoint {path} keeps its experts {'in the SSD tier' if tiered_ckpt else 'as resident parameters'}; "
                f"resume it with storage.enabled={'true' if tiered_ckpt else 'false'}"
            )
        progress = restore_rank_state(manifest, self.model, self.optimizer, self.layout, self.ctx.rank, self.ctx.world_size)
        if self.tiered is not None:
            self.tiered.restore_checkpoint(path, expected_index_names(list(manifest.files)))
        self.step = int(progress["step"])
        self.nan_skips = int(progress["nan_skips"])
        self.tokens_seen = int(progress["tokens_seen"])
        check_tokenizer_on_resume(progress.get("tokenizer"), self.split.tokenizer_identity(), str(path))
        self.batcher.load_state_dict(progress["data"])
        if self.scaler is not None and progress.get("loss_scaler"):
            self.scaler.load_state_dict(progress["loss_scaler"])
        self.resumed_from = path
        logger.info("resumed from %s at step %d", path, self.step)
        return True

    # ------------------------------------------------------------------ the loop
    def _stop_signal(self) -> int:
        """The stop signal any rank received (0: none), the same on every rank (a max all-reduce
        at the step boundary; no collective when no :attr:`stop_request` is installed)."""
        if self.stop_request is None:
            return 0
        self.stop_request.announce()
        return int(self._all_reduce([self.stop_request.signum], "max", "stop request")[0])

    def fit(self) -> dict[str, float]:
        cfg = self.cfg
        run = cfg.train
        if self.ctx.is_main:  # interrupted saves' leftovers (the output-directory lock keeps other runs out)
            remove_partial(self.ckpt_root)
        resumed = self.resume(run.resume)
        if not resumed and (self.ckpt_root / LATEST).exists():
            raise TrainingError(
                f"{self.output_dir} already holds checkpoints ({(self.ckpt_root / LATEST).read_text().strip()}); "
                "resume with -o train.resume=auto or pick another -o train.output_dir (nothing was overwritten)"
            )
        if self.ctx.is_main and not resumed:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            dump_yaml(cfg, self.output_dir / "config.yaml")
        self.metrics.drop_after(self.step)  # records logged after the checkpoint would repeat
        logger.info(
            "training from step %d to %d; unigram baseline (held-out) %.3f nats/token",
            self.step, run.max_steps, self.unigram_baseline,
        )
        progress = Progress(self.step, run.max_steps)
        tokens_per_step = cfg.data.global_batch_size * cfg.data.seq_len
        self._last_logged_loss = float("nan")
        val_loss = float("nan")
        self._ensure_experts()
        while self.step < run.max_steps:
            lr = lr_at(self.step, cfg.optim, run.max_steps)
            self.optimizer.set_lr(lr)
            last = self.train_step(next(self.batcher))
            self.step += 1
            self.tokens_seen += tokens_per_step
            if self.step % run.log_every == 0 or self.step == run.max_steps:
                self._log_train(last, lr, progress, tokens_per_step)
            if self.step % run.eval_every == 0 or self.step == run.max_steps:
                val_loss = self._validate()
                if self.ctx.is_main:
                    logger.info("step %d: val loss %.4f (unigram baseline %.3f)", self.step, val_loss, self.unigram_baseline)
            saved = None
            if run.save_every and self.step % run.save_every == 0 and self.step < run.max_steps:
                saved = self.save_checkpoint()
            signum = self._stop_signal()
            if signum and self.step < run.max_steps:  # every rank stops after the same step
                ckpt = saved or self.save_checkpoint()
                self._close()
                raise Preempted(self.step, ckpt, signal.Signals(signum).name)
        if not math.isfinite(val_loss):  # nothing ran here (resumed at max_steps): still report
            val_loss = self._validate()
        final_ckpt = self.save_checkpoint()
        self._close()
        summary = {
            "step": self.step,
            "train_loss": self._last_logged_loss,
            "val_loss": val_loss,
            "unigram_baseline": self.unigram_baseline,
            "nan_skips": self.nan_skips,
        }
        if self.ctx.is_main:
            logger.info("done: %s", summary)
            logger.info("checkpoint: %s", final_ckpt.resolve())
            logger.info("metrics: %s", self.metrics.jsonl_path.resolve())
            if self.metrics.logdir is not None:
                logger.info("VisualDL: visualdl --logdir %s", Path(self.metrics.logdir).resolve())
        return summary

    def _validate(self) -> float:
        """The held-out loss, logged as ``val`` metrics."""
        val_loss = self.evaluate()
        scalars = {"loss": val_loss, "unigram_baseline": self.unigram_baseline}
        self.metrics.scalars(self.step, scalars, prefix="val")
        return val_loss

    def _close(self) -> None:
        self.metrics.close()
        if self.tiered is not None:
            self.tiered.close()

    def _log_train(self, r: StepResult, lr: float, progress: Progress, tokens_per_step: int) -> None:
        dt, ds = progress.interval(self.step)
        # a log step: the first host read of the step's lm/aux losses and routing statistics
        sums = r.sums
        ws = self.ctx.world_size
        loss, lm, aux = self._all_reduce([r.loss, float(sums.lm_loss), float(sums.aux_loss)]) / ws
        self._last_logged_loss = lm
        tps = tokens_per_step * ds / dt if dt > 0 else float("nan")
        dropped = float(sums.dropped)
        demand = self._sum_arrays([d.numpy() for d in sums.demand])
        scalars = {
            "loss": loss, "lm_loss": lm, "aux_loss": aux, "lr": lr, "grad_norm": r.grad_norm,
            "tokens_per_s": tps, "dropped_fraction": dropped, "peak_rss_bytes": float(peak_rss_bytes()),
            "nan_skips": float(self.nan_skips),
        }
        self.metrics.scalars(self.step, scalars)
        # routing health per MoE layer: max/mean load, dropped share per choice rank, aux-free bias
        by_choice = [c.numpy() for c in sums.dropped_by_choice]
        if ws > 1:
            by_choice = [c / ws for c in self._sum_arrays(by_choice, "dropped by choice")]
        routing = routing_scalars(self.cfg.model.moe_layers, demand, by_choice, balance_biases(self.model))
        if routing:
            self.metrics.scalars(self.step, routing, prefix="routing")
        storage: dict[str, float] = {}  # this rank's storage counters (only alpha with resident lazy experts)
        for part in (self.optimizer.lazy, self.optimizer.sharded_dense):
            if part is not None:
                storage.update(part.interval_scalars())
        if storage:
            self.metrics.scalars(self.step, storage, prefix="storage")
        if self.cfg.monitor.expert_histograms:
            for layer, d in zip(self.cfg.model.moe_layers, demand):
                self.metrics.histogram(self.step, f"expert_load/layer{layer}", np.asarray(d))
        if self.ctx.is_main:
            logger.info(
                "step %d/%d | loss %.4f (lm %.4f aux %.4f) | lr %.2e | gnorm %.3f | %.0f tok/s | drop %.3f | ETA %s",
                self.step, self.cfg.train.max_steps, loss, lm, aux, lr, r.grad_norm, tps, dropped,
                format_eta(progress.eta(self.step)),
            )
