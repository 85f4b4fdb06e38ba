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
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import paddle
import paddle.distributed as dist

from paddle_semoe.comm import ExpertExchange, GradientReducer, clip_grad_norm_, reduce_gradients_unfused
from paddle_semoe.comm.transport import make_communicator
from paddle_semoe.config import dump_yaml, to_dict
from paddle_semoe.data import TokenBatcher, load_split, unigram_cross_entropy_nats, val_batches
from paddle_semoe.engine import checkpoint as ckpt
from paddle_semoe.engine.amp import autocast, scaler_for, unscale_
from paddle_semoe.engine.config import TrainConfig
from paddle_semoe.engine.distributed import DistContext
from paddle_semoe.engine.metrics import MetricsLogger, Progress, format_eta, peak_rss_bytes
from paddle_semoe.engine.optim import MoEOptimizer, lr_at
from paddle_semoe.engine.state import ExpertLayout, collect_rank_state, restore_rank_state
from paddle_semoe.models.gpt import GPTMoE
from paddle_semoe.moe.experts import GroupedExperts, deferred_expert_weights

logger = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """The run cannot continue (e.g. too many non-finite steps)."""


@dataclass
class StepResult:
    loss: float
    lm_loss: float
    aux_loss: float
    grad_norm: float
    skipped: bool
    demand: list[np.ndarray]  # per MoE layer: routing choices per expert (this rank)
    dropped: float


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
    layer_idx = 0
    for _, sub in model.named_sublayers():
        if not isinstance(sub, GroupedExperts):
            continue
        for pname in ("w1", "w2"):
            p = getattr(sub, pname)
            slices = [
                expert_init_value(seed, layer_idx, layout.offset + local, pname, tuple(p.shape[1:]), std)
                for local in range(layout.num_local)
            ]
            p.set_value(np.stack(slices))
        layer_idx += 1


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

        # data: every rank is data-parallel; the global batch is split over ranks and micro-steps
        per_step = ctx.world_size * cfg.optim.grad_accum_steps
        if cfg.data.global_batch_size % per_step:
            raise ValueError(
                f"data.global_batch_size={cfg.data.global_batch_size} must be divisible by "
                f"world_size x optim.grad_accum_steps = {ctx.world_size} x {cfg.optim.grad_accum_steps}"
            )
        self.split = load_split(cfg.data.corpus, cfg.data.val_fraction)
        self.unigram_baseline = unigram_cross_entropy_nats(self.split.train, self.split.val, mcfg.vocab_size)
        self.batcher = TokenBatcher(
            self.split.train, cfg.data.global_batch_size, cfg.data.seq_len,
            seed=cfg.train.seed, rank=ctx.rank, world_size=ctx.world_size,
        )

        # model: dense weights identical on every rank (same seed); experts by global index
        paddle.seed(cfg.train.seed)
        backend = "nccl" if par.a2a_backend == "nccl_fused" else par.a2a_backend  # collectives of the fused path
        self.comm = None if ctx.world_size == 1 else make_communicator(backend, rank=ctx.rank, timeout_s=par.comm_timeout_s)
        exchange = None
        if ep > 1 and par.a2a_backend == "nccl_fused":
            from paddle_semoe.comm.nccl_fused import FusedNcclExchange

            exchange = FusedNcclExchange(
                self.topology, mcfg.moe.num_experts // ep, hierarchical=par.hierarchical_a2a, timeout_s=par.comm_timeout_s
            )
        elif ep > 1:
            exchange = ExpertExchange(
                self.topology, mcfg.moe.num_experts // ep, communicator=self.comm, hierarchical=par.hierarchical_a2a
            )
        with deferred_expert_weights(cfg.storage.enabled):  # tiered: no expert stack is ever allocated
            self.model = GPTMoE(mcfg, moe_exchange=exchange, ep_size=ep, recompute_moe=cfg.train.recompute_experts)
        self.tiered = None
        if cfg.storage.enabled:
            from paddle_semoe.storage.tiered import build_tiered_experts

            self.tiered = build_tiered_experts(cfg, self.model, self.layout, ctx.rank, ctx.world_size)
        else:
            init_experts_by_global_index(self.model, cfg.train.seed, self.layout, mcfg.init_std)
        sharded_dense = None
        if cfg.storage.shard_dense:  # horizontal prefetch: dense shards gathered ahead of each block
            from paddle_semoe.storage.adamw import AdamWHyper
            from paddle_semoe.storage.dense_shard import build_sharded_dense

            o = cfg.optim
            group = self.topology.sharding_group.ranks if self.topology.sharding_group is not None else (ctx.rank,)
            sharded_dense = build_sharded_dense(self.model, group, ctx.rank, AdamWHyper(o.beta1, o.beta2, o.eps, o.weight_decay))
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
        params = [p for p in self.model.parameters() if not p.stop_gradient]
        self.params = params
        self.reducer = None
        if ctx.world_size > 1 and par.fused_grad_buckets:
            bucket = int(par.bucket_mb * (1 << 20)) if par.bucket_mb is not None else None
            self.reducer = GradientReducer(params, self.topology, self.comm, bucket)

        self.step = 0
        self.nan_skips = 0
        self.tokens_seen = 0
        self._lazy_kept: list[np.ndarray] = []  # lazy expert update: rows kept per global expert, this step
        self.metrics = MetricsLogger(
            self.output_dir,
            Path(cfg.monitor.logdir or self.output_dir / "vdl") if cfg.monitor.visualdl else None,
            enabled=ctx.is_main,
        )

    # ------------------------------------------------------------------ collectives
    def _all_reduce(self, values: list[float], op: str = "sum") -> list[float]:
        if self.ctx.world_size == 1:
            return values
        t = paddle.to_tensor(np.asarray(values, dtype=np.float64))
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return [float(v) for v in t.numpy()]

    def _barrier(self) -> None:
        if self.ctx.world_size > 1:
            dist.barrier()

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
        if self.ctx.world_size > 1 and kept:
            flat = self._all_reduce([float(v) for k in kept for v in k])
            kept = np.split(np.asarray(flat), np.cumsum([k.size for k in kept])[:-1])
        lo, hi = self.layout.offset, self.layout.offset + self.layout.num_local
        return [np.asarray(k)[lo:hi] for k in kept]

    def accumulate_gradients(self, batch: np.ndarray) -> tuple[float, float, float, list[np.ndarray], float]:
        """Forward/backward over the micro-batches of ``batch`` and the gradient reduction.

        Leaves synchronized, unscaled gradients in ``.grad``. Returns (loss, lm loss, aux loss,
        per-layer expert demand, dropped fraction) of this rank.
        """
        cfg = self.cfg
        self._ensure_experts()
        self.model.train()
        accum = cfg.optim.grad_accum_steps
        lazy = self.optimizer.lazy
        loss_sum = lm_sum = aux_sum = 0.0
        demand: list[np.ndarray] = []
        self._lazy_kept = []
        dropped = 0.0
        scale = self.scaler.scale if self.scaler is not None else 1.0
        for x, y in self._micro_batches(batch):
            with autocast(cfg.amp):
                out = self.model(x, y)
            (out.loss * (scale / accum)).backward()
            if lazy is not None:
                lazy.after_backward()
                for i, s in enumerate(out.moe_stats):
                    k = s.kept.numpy().astype(np.int64)
                    if len(self._lazy_kept) <= i:
                        self._lazy_kept.append(k)
                    else:
                        self._lazy_kept[i] += k
            loss_sum += float(out.loss) / accum
            lm_sum += float(out.lm_loss) / accum
            aux_sum += float(out.aux_loss) / accum
            for i, s in enumerate(out.moe_stats):
                d = s.demand.numpy()
                if len(demand) <= i:
                    demand.append(d.astype(np.int64))
                else:
                    demand[i] += d
                dropped += float(s.dropped_fraction) / (accum * max(len(out.moe_stats), 1))

        if self.reducer is not None:
            self.reducer.reduce()
        elif self.ctx.world_size > 1:
            reduce_gradients_unfused(self.params, self.topology, self.comm)
        if scale != 1.0:
            unscale_(self.params, scale)
        return loss_sum, lm_sum, aux_sum, demand, dropped

    def train_step(self, batch: np.ndarray) -> StepResult:
        cfg = self.cfg
        loss_sum, lm_sum, aux_sum, demand, dropped = self.accumulate_gradients(batch)

        # global norm (MoE-aware) for logging and clipping
        max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        expert_coef = 1.0
        lazy = self.optimizer.lazy
        if lazy is not None:
            from paddle_semoe.storage.lazy import clip_grad_norm_lazy_

            lazy.set_active(self._lazy_activity(self._lazy_kept))
            grad_norm, expert_coef = clip_grad_norm_lazy_(
                self.params, lazy, max_norm if math.isfinite(max_norm) else 1e30, self.topology, self.comm
            )
        else:
            grad_norm = clip_grad_norm_(self.params, max_norm if math.isfinite(max_norm) else 1e30, self.topology, self.comm)
        bad = 0.0 if (math.isfinite(loss_sum) and math.isfinite(grad_norm)) else 1.0
        bad = self._all_reduce([bad], op="max")[0]
        skipped = bad > 0
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
            self.optimizer.step(expert_grad_scale=expert_coef)
        self.optimizer.clear_grad()
        return StepResult(loss_sum, lm_sum, aux_sum, grad_norm, skipped, demand, dropped)

    @paddle.no_grad()
    def evaluate(self) -> float:
        """Mean token cross-entropy on the held-out split (all ranks, equal batch counts)."""
        cfg = self.cfg
        self._ensure_experts()
        self.model.eval()
        per_rank = max(cfg.data.global_batch_size // self.ctx.world_size, 1)
        total = count = 0.0
        for batch in val_batches(
            self.split.val, per_rank, cfg.data.seq_len, max_batches=cfg.train.eval_batches,
            rank=self.ctx.rank, world_size=self.ctx.world_size,
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
            "loss_scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }

    def save_checkpoint(self) -> Path:
        """Collective: every rank writes its shard; rank 0 writes the manifest and publishes."""
        final = self.ckpt_root / ckpt.step_dir_name(self.step)
        tmp = final.with_name(final.name + ".tmp")
        if self.ctx.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self._barrier()
        self.optimizer.sync_params()
        tensors, meta = collect_rank_state(self.model, self.optimizer, self.layout, self.ctx.rank, self._progress())
        record = ckpt.save_shard(tmp / ckpt.shard_name(self.ctx.rank), tensors, meta)
        records = self._gather_records(record)
        if self.tiered is not None:  # the SSD tier: hard links + one checksummed index per rank
            from paddle_semoe.storage.tiered import index_name

            name, sha, nbytes = self.tiered.save_checkpoint(tmp, self.ctx.rank)
            records += self._gather_records(ckpt.FileRecord(name, sha, nbytes), name_of=index_name)
        if self.ctx.is_main:
            dump_yaml(self.cfg, tmp / "config.yaml")
            records.append(ckpt.FileRecord("config.yaml", ckpt.sha256_file(tmp / "config.yaml"), (tmp / "config.yaml").stat().st_size))
            manifest_meta = {
                "ep_degree": self.layout.ep_degree,
                "num_experts": self.layout.num_experts,
                "sharded_dense_optimizer": self.optimizer.sharded is not None,
                "expert_storage": self.tiered is not None,
                "model": to_dict(self.cfg.model),
            }
            ckpt.write_manifest(tmp, self.step, self.ctx.world_size, records, manifest_meta)
            ckpt.publish(tmp, final, self.cfg.train.keep_checkpoints)
        self._barrier()
        return final

    def _gather_records(self, record: ckpt.FileRecord, name_of=ckpt.shard_name) -> list[ckpt.FileRecord]:
        """All ranks' file records on every rank (sha256 as 4 int64 words + size); the file of
        rank r is named ``name_of(r)``."""
        if self.ctx.world_size == 1:
            return [record]
        words = np.frombuffer(bytes.fromhex(record.sha256), dtype=">u8").astype(np.uint64).view(np.int64)
        mine = paddle.to_tensor(np.concatenate([words, [record.bytes]]).astype(np.int64))
        gathered: list[paddle.Tensor] = []
        dist.all_gather(gathered, mine)
        out = []
        for r, t in enumerate(gathered):
            arr = t.numpy()
            sha = arr[:4].view(np.uint64).astype(">u8").tobytes().hex()
            out.append(ckpt.FileRecord(name_of(r), sha, int(arr[4])))
        return out

    def resume(self, spec: str | None) -> bool:
        path = ckpt.resolve_checkpoint(spec, self.ckpt_root)
        if path is None:
            return False
        manifest = ckpt.read_manifest(path)
        tiered_ckpt = bool(manifest.meta.get("expert_storage", False))
        if tiered_ckpt != (self.tiered is not None):
            raise ckpt.CheckpointError(
                f"checkpoint {path} keeps its experts {'in the SSD tier' if tiered_ckpt else 'as resident parameters'}; "
                f"resume it with storage.enabled={'true' if tiered_ckpt else 'false'}"
            )
        progress = restore_rank_state(manifest, self.model, self.optimizer, self.layout, self.ctx.rank, self.ctx.world_size)
        if self.tiered is not None:
            from paddle_semoe.storage.tiered import expected_index_names

            self.tiered.restore_checkpoint(path, expected_index_names(list(manifest.files)))
        self.step = int(progress["step"])
        self.nan_skips = int(progress["nan_skips"])
        self.tokens_seen = int(progress["tokens_seen"])
        self.batcher.load_state_dict(progress["data"])
        if self.scaler is not None and progress.get("loss_scaler"):
            self.scaler.load_state_dict(progress["loss_scaler"])
        logger.info("resumed from %s at step %d", path, self.step)
        return True

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict[str, float]:
        cfg = self.cfg
        run = cfg.train
        resumed = self.resume(run.resume)
        if not resumed and (self.ckpt_root / ckpt.LATEST).exists():
            raise TrainingError(
                f"{self.output_dir} already holds checkpoints ({(self.ckpt_root / ckpt.LATEST).read_text().strip()}); "
                "resume with -o train.resume=auto or pick another -o train.output_dir (nothing was overwritten)"
            )
        if self.ctx.is_main and not resumed:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            dump_yaml(cfg, self.output_dir / "config.yaml")
        logger.info(
            "training from step %d to %d; unigram baseline (held-out) %.3f nats/token",
            self.step, run.max_steps, self.unigram_baseline,
        )
        progress = Progress(self.step, run.max_steps)
        tokens_per_step = cfg.data.global_batch_size * cfg.data.seq_len
        last: StepResult | None = None
        self._last_logged_loss = float("nan")
        val_loss = float("nan")
        self._ensure_experts()
        while self.step < run.max_steps:
            lr = lr_at(self.step, cfg.optim, run.max_steps)
            self.optimizer.set_lr(lr)
            batch = next(self.batcher)
            last = self.train_step(batch)
            self.step += 1
            self.tokens_seen += tokens_per_step
            if self.step % run.log_every == 0 or self.step == run.max_steps:
                self._log_train(last, lr, progress, tokens_per_step)
            if self.step % run.eval_every == 0 or self.step == run.max_steps:
                val_loss = self.evaluate()
                self.metrics.scalars(self.step, {"loss": val_loss, "unigram_baseline": self.unigram_baseline}, prefix="val")
                if self.ctx.is_main:
                    logger.info("step %d: val loss %.4f (unigram baseline %.3f)", self.step, val_loss, self.unigram_baseline)
            if run.save_every and self.step % run.save_every == 0 and self.step < run.max_steps:
                self.save_checkpoint()
        if not math.isfinite(val_loss):  # nothing ran here (resumed at max_steps): still report
            val_loss = self.evaluate()
            self.metrics.scalars(self.step, {"loss": val_loss, "unigram_baseline": self.unigram_baseline}, prefix="val")
        final_ckpt = self.save_checkpoint()
        self.metrics.close()
        if self.tiered is not None:
            self.tiered.close()
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

    def _log_train(self, r: StepResult, lr: float, progress: Progress, tokens_per_step: int) -> None:
        dt, ds = progress.interval(self.step)
        loss, lm, aux = (v / self.ctx.world_size for v in self._all_reduce([r.loss, r.lm_loss, r.aux_loss]))
        self._last_logged_loss = lm
        tps = tokens_per_step * ds / dt if dt > 0 else float("nan")
        demand = [d for d in r.demand]
        if demand and self.ctx.world_size > 1:
            flat = self._all_reduce([float(v) for d in demand for v in d])
            sizes = [d.size for d in demand]
            demand = np.split(np.asarray(flat), np.cumsum(sizes)[:-1])
        scalars = {
            "loss": loss, "lm_loss": lm, "aux_loss": aux, "lr": lr, "grad_norm": r.grad_norm,
            "tokens_per_s": tps, "dropped_fraction": r.dropped, "peak_rss_bytes": float(peak_rss_bytes()),
            "nan_skips": float(self.nan_skips),
        }
        self.metrics.scalars(self.step, scalars)
        storage = {}  # this rank's storage counters (only alpha with resident lazy experts)
        if self.optimizer.lazy is not None:
            storage.update(self.optimizer.lazy.interval_scalars())
        if self.optimizer.sharded_dense is not None:
            storage.update(self.optimizer.sharded_dense.interval_scalars())
        if storage:
            self.metrics.scalars(self.step, storage, prefix="storage")
        if self.cfg.monitor.expert_histograms:
            for layer, d in zip(self.cfg.model.moe_layers, demand):
                self.metrics.histogram(self.step, f"expert_load/layer{layer}", np.asarray(d))
        if self.ctx.is_main:
            logger.info(
                "step %d/%d | loss %.4f (lm %.4f aux %.4f) | lr %.2e | gnorm %.3f | %.0f tok/s | drop %.3f | ETA %s",
                self.step, self.cfg.train.max_steps, loss, lm, aux, lr, r.grad_norm, tps, r.dropped,
                format_eta(progress.eta(self.step)),
            )
