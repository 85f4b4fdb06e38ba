"""The elastic multi-task training loop: profile, plan, group, train, checkpoint, resume anywhere.

Start-up on every rank (all collective steps in the same order everywhere):

1. task costs (:mod:`~paddle_semoe.elastic.cost`), averaged over the ranks, broadcast from rank 0;
2. the plan (:mod:`~paddle_semoe.elastic.planner`), explained in the log by rank 0 against the
   naive one-rank-per-task plan and written to ``<output_dir>/plan.json``; every rank checks
   that all ranks computed the same plan;
3. the task groups, the model with the hosted tasks' parameters only, AdamW, the gradient sync;
4. resume (``train.resume=auto``) from a checkpoint written by any number of ranks under any
   plan (:mod:`~paddle_semoe.elastic.state`); the parameters' checksum, recomputed across the
   ranks, must equal the checkpoint's.

One step: the rank's samples of all its tasks go through the model in one batch (task-routed
MoE) under the local objective of :mod:`~paddle_semoe.elastic.sync` (exact for any plan), then
gradient sums, global-norm clipping and AdamW. A step's data is a pure function of
``(seed, task, step)``, so a resumed or resized job sees exactly the samples the uninterrupted
job would have seen.

Metrics (rank 0; VisualDL + ``metrics.jsonl``): per-task loss, samples/s, per-rank busy/idle
seconds per step, per-task held-out accuracy. ``events.jsonl``: plan, saves and restores with
checksums. ``timings.npz``: every step's phase times of every rank.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
import paddle
import paddle.nn.functional as F

from paddle_semoe.comm.topology import CommGroup
from paddle_semoe.comm.transport import make_communicator
from paddle_semoe.elastic.config import ElasticConfig, ElasticRunConfig, TaskSpec, check_tasks
from paddle_semoe.elastic.cost import CostFit, profile_task_costs
from paddle_semoe.elastic.groups import TaskGroups, build_task_groups
from paddle_semoe.elastic.planner import TaskLoad, explain_plan, make_plan, plan_naive
from paddle_semoe.elastic.state import live_digest, restore_elastic, save_elastic
from paddle_semoe.elastic.sync import ElasticGradSync, sample_weight
from paddle_semoe.elastic.timing import COLUMNS, StepTimer, summarize_steps
from paddle_semoe.engine.checkpoint import TrainingError
from paddle_semoe.engine.config import MonitorConfig, OptimConfig
from paddle_semoe.engine.metrics import MetricsLogger, Progress, format_eta
from paddle_semoe.engine.optim import lr_at
from paddle_semoe.io.checkpoint import LATEST, CheckpointError, read_manifest, resolve_checkpoint

logger = logging.getLogger(__name__)

__all__ = ["ElasticTrainer", "MultiTaskModel", "TrainingError", "Workload", "task_loads"]


class MultiTaskModel(Protocol):
    """What the trainer needs from a model (e.g. :class:`~paddle_semoe.models.ufo.UFOModel`)."""

    hosted: tuple[int, ...]
    num_moe_blocks: int

    def __call__(self, images: paddle.Tensor, task_local: paddle.Tensor) -> Any:
        """-> an object with ``cls`` [N, D] features and ``use_task`` (list of bool tensors)."""

    def head(self, task: int, cls: paddle.Tensor) -> paddle.Tensor:
        """Logits of ``task`` (global index)."""

    def named_parameters(self) -> Any: ...

    def parameters(self) -> Any: ...

    def train(self) -> Any: ...

    def eval(self) -> Any: ...


class Workload(Protocol):
    """The tasks, their data and the model factory."""

    tasks: tuple[TaskSpec, ...]

    def build_model(self, hosted: Sequence[int]) -> MultiTaskModel:
        """A model holding the shared parameters and those of ``hosted``, initialized from the
        seed and parameter names only (bit-identical across plans)."""

    def train_samples(self, task: int, step: int, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Samples ``[start, start+count)`` of ``task``'s global batch at ``step``: (x, int64 y)."""

    def eval_samples(self, task: int) -> tuple[np.ndarray, np.ndarray]:
        """The held-out set of ``task``."""

    def flops_per_sample(self, task: int) -> float:
        """Forward + backward FLOPs of one sample of ``task``."""


def task_loads(tasks: Sequence[TaskSpec], fits: Sequence[CostFit]) -> list[TaskLoad]:
    return [TaskLoad(t.name, t.batch_size, f.per_sample_s, f.overhead_s) for t, f in zip(tasks, fits)]


def config_costs(tasks: Sequence[TaskSpec], workload: Workload | None, source: str, flops_per_s: float) -> list[CostFit]:
    """Costs that need no measurement (``config`` or ``flops``)."""
    if source == "config":
        return [CostFit(float(t.per_sample_cost or 0.0), float(t.overhead_cost)) for t in tasks]  # set: check_tasks
    if source == "flops":
        if workload is None:
            raise ValueError("cost_source=flops needs the workload's FLOP counts")
        return [CostFit(workload.flops_per_sample(i) / flops_per_s, 0.0) for i in range(len(tasks))]
    raise ValueError(f"cost source {source!r} needs a measurement")


class ElasticTrainer:
    """One rank of an elastic multi-task job (see the module docstring).

    Args:
        workload: tasks, data, model factory.
        elastic, optim, run, monitor: config sections.
        write_config: writes the resolved job config to a path (saved beside checkpoints).
        world_size, rank: the job (``paddle.distributed`` must be initialized when > 1).
    """

    def __init__(
        self,
        workload: Workload,
        elastic: ElasticConfig,
        optim: OptimConfig,
        run: ElasticRunConfig,
        monitor: MonitorConfig,
        *,
        write_config: Any = None,
        world_size: int = 1,
        rank: int = 0,
    ) -> None:
        self.workload = workload
        self.tasks = tuple(workload.tasks)
        check_tasks(self.tasks, elastic.cost_source)
        self.elastic, self.optim_cfg, self.run, self.monitor = elastic, optim, run, monitor
        self.write_config = write_config
        self.rank = rank
        self.world_size = world_size
        # every collective of the job (costs, plan check, gradients, metrics, checkpoints) goes
        # through this communicator, under its watchdog
        self.comm = make_communicator("auto" if world_size > 1 else "gloo", rank=rank, timeout_s=elastic.comm_timeout_s)
        self.world = CommGroup("world", tuple(range(world_size)), rank, None)
        self.is_main = rank == 0
        self.output_dir = Path(run.output_dir)
        self.ckpt_root = self.output_dir / "checkpoints"
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        self._write_pid()

        fits, source = self._costs()
        loads = task_loads(self.tasks, fits)
        self.plan = make_plan(elastic.plan, loads, world_size)
        self.baseline = plan_naive(loads, world_size)
        self._check_plan_agreement()
        if self.is_main:
            logger.info("%s", explain_plan(self.plan, self.baseline, source))
            (self.output_dir / "plan.json").write_text(json.dumps(
                {"plan": self.plan.to_dict(), "naive": self.baseline.to_dict(), "cost_source": source,
                 "predicted_busy_s": self.plan.busy(), "naive_predicted_busy_s": self.baseline.busy()}, indent=2) + "\n")

        self.hosted = self.plan.rank_tasks(rank)
        self.groups: TaskGroups = build_task_groups(self.plan) if world_size > 1 else TaskGroups.from_handles(self.plan, 0)
        paddle.seed(run.seed)
        self.model = workload.build_model(self.hosted)
        self.named = [(n, p) for n, p in self.model.named_parameters() if not p.stop_gradient]
        decay = {p.name for _, p in self.named if len(p.shape) >= 2}
        self.optimizer = paddle.optimizer.AdamW(
            learning_rate=optim.lr, parameters=[p for _, p in self.named], beta1=optim.beta1, beta2=optim.beta2,
            epsilon=optim.eps, weight_decay=optim.weight_decay, apply_decay_param_fun=lambda name: name in decay,
        )
        self.sync = ElasticGradSync(self.named, self.plan, self.groups, self.comm, int(elastic.bucket_mb * (1 << 20)))
        self.local_of = {t: j for j, t in enumerate(self.hosted)}
        self.weights = [sample_weight(self.plan, t, spec.loss_weight) for t, spec in enumerate(self.tasks)]
        self.step = 0
        self.samples_seen = np.zeros(len(self.tasks), dtype=np.int64)
        self.timer = StepTimer()
        self._share = np.zeros((len(self.tasks), self.model.num_moe_blocks, 2))  # tokens on the task expert, tokens
        self.timing_rows: list[np.ndarray] = []  # rank 0: [world, steps, columns] per log interval
        self.metrics = MetricsLogger(
            self.output_dir, Path(monitor.logdir or self.output_dir / "vdl") if monitor.visualdl else None, enabled=self.is_main
        )

    # ------------------------------------------------------------------ set-up helpers
    def _write_pid(self) -> None:
        pid_dir = self.output_dir / "pids"
        pid_dir.mkdir(parents=True, exist_ok=True)
        (pid_dir / f"rank{self.rank}.pid").write_text(f"{os.getpid()}\n")

    def _costs(self) -> tuple[list[CostFit], str]:
        cfg = self.elastic
        if cfg.cost_source != "profile":
            return config_costs(self.tasks, self.workload, cfg.cost_source, cfg.assumed_flops_per_s), cfg.cost_source
        model = self.workload.build_model(range(len(self.tasks)))

        def run_task(task: int, n: int) -> None:
            x, y = self.workload.train_samples(task, 0, 0, n)
            out = model(paddle.to_tensor(x), paddle.full([n], task, dtype="int32"))
            F.cross_entropy(model.head(task, out.cls), paddle.to_tensor(y), reduction="sum").backward()
            for p in model.parameters():
                p.clear_gradient(False)

        def sizes(task: int) -> tuple[int, int]:
            b = self.tasks[task].batch_size
            small = max(1, b // 4)
            return small, max(b, small + 1)

        t0 = time.perf_counter()
        fits = profile_task_costs(run_task, len(self.tasks), sizes, cfg.profile_repeats, cfg.profile_warmup)
        local = np.array([[f.per_sample_s, f.overhead_s] for f in fits], dtype=np.float64)
        mean = self.comm.broadcast(self.comm.all_reduce(local, self.world, what="task costs") / self.world_size, self.world)
        logger.info("profiled %d tasks in %.2fs (rank-local fit %s)", len(self.tasks), time.perf_counter() - t0, local.tolist())
        return [CostFit(float(a), float(b)) for a, b in mean], f"profiled on {self.world_size} rank(s), mean of ranks"

    def _check_plan_agreement(self) -> None:
        h = int.from_bytes(hashlib.sha256(json.dumps(self.plan.to_dict(), sort_keys=True).encode()).digest()[:6], "little")
        both = self.comm.all_reduce(np.array([h, -h], dtype=np.int64), self.world, "max", "plan agreement")
        if both[0] != h or -both[1] != h:
            raise TrainingError(f"rank {self.rank}: ranks computed different plans (costs differ?); refusing to train")

    def _event(self, **record: Any) -> None:
        if self.is_main:
            record.setdefault("time", time.time())
            with open(self.output_dir / "events.jsonl", "a") as fh:
                fh.write(json.dumps(record) + "\n")

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Path:
        progress = {"step": self.step, "seed": self.run.seed, "samples_seen": self.samples_seen.tolist()}
        path, sha = save_elastic(
            self.ckpt_root, self.step, self.plan, self.named, self.optimizer, progress,
            self.comm, self.world, self.run.keep_checkpoints, self.write_config,
        )
        self._event(event="save", step=self.step, path=str(path), param_sha256=sha, world_size=self.world_size,
                    plan=self.plan.to_dict())
        logger.info("step %d: checkpoint %s (params sha256 %s...)", self.step, path, sha[:16])
        return path

    def resume(self) -> bool:
        spec = self.run.resume
        if spec == "none":
            if (self.ckpt_root / LATEST).exists():
                raise TrainingError(
                    f"{self.output_dir} already holds checkpoints; use train.resume=auto or another train.output_dir"
                )
            return False
        path = resolve_checkpoint(spec, self.ckpt_root)
        if path is None:
            return False
        manifest = read_manifest(path)
        progress = restore_elastic(manifest, self.plan, self.named, self.optimizer)
        if int(progress["seed"]) != self.run.seed:
            raise CheckpointError(f"checkpoint {path} was trained with seed {progress['seed']}, this job has {self.run.seed}")
        self.step = int(progress["step"])
        self.samples_seen = np.asarray(progress["samples_seen"], dtype=np.int64)
        old_world = manifest.world_size
        sha, _ = live_digest(self.named, self.plan, self.comm, self.world)
        saved = manifest.meta["param_sha256"]
        self._event(event="restore", step=self.step, path=str(path), param_sha256=sha, checkpoint_sha256=saved,
                    from_world_size=old_world, world_size=self.world_size, plan=self.plan.to_dict())
        if self.elastic.verify_restore and sha != saved:
            raise CheckpointError(f"restored parameters sha256 {sha[:16]}... != checkpoint {path} sha256 {saved[:16]}...")
        logger.info(
            "resumed from %s at step %d (saved by %d ranks, now %d; params sha256 %s... %s)",
            path, self.step, old_world, self.world_size, sha[:16], "verified" if sha == saved else "NOT verified",
        )
        return True

    # ------------------------------------------------------------------ one step
    def _batch(self, step: int) -> tuple[paddle.Tensor, paddle.Tensor, list[tuple[int, int, int, paddle.Tensor]]]:
        xs, tls, parts = [], [], []
        off = 0
        for t in self.hosted:
            shard = self.plan.shard(t, self.rank)
            assert shard is not None, f"the plan hosts task {t} on rank {self.rank} without a shard"
            x, y = self.workload.train_samples(t, step, shard.start, shard.count)
            xs.append(x)
            tls.append(np.full(shard.count, self.local_of[t], dtype=np.int32))
            parts.append((t, off, shard.count, paddle.to_tensor(y)))
            off += shard.count
        if not xs:
            return None, None, []
        return paddle.to_tensor(np.concatenate(xs)), paddle.to_tensor(np.concatenate(tls)), parts

    def train_step(self) -> tuple[np.ndarray, np.ndarray, float]:
        """One optimizer step. Returns (per-task loss sums, per-task sample counts, grad norm),
        local to this rank for the first two."""
        T = len(self.tasks)
        loss_sum = np.zeros(T)
        count = np.zeros(T)
        self.timer.start_step()
        images, task_local, parts = self._batch(self.step)
        if parts:
            out = self.model(images, task_local)
            terms = []
            for t, off, n, y in parts:
                ce = F.cross_entropy(self.model.head(t, out.cls[off:off + n]), y, reduction="sum")
                terms.append(ce * self.weights[t])
                loss_sum[t] = float(ce)
                count[t] = n
            sum(terms[1:], terms[0]).backward()
            if self._want_share():
                self._count_share(out.use_task, parts)
        self.timer.mark("compute")
        self.sync.reduce()
        clip = self.optim_cfg.grad_clip
        norm = self.sync.clip_(clip if clip > 0 else math.inf)
        self.timer.mark("sync")
        if not math.isfinite(norm) or not np.all(np.isfinite(loss_sum)):
            raise TrainingError(f"step {self.step}: non-finite loss {loss_sum.tolist()} or grad norm {norm}; lower optim.lr")
        self.optimizer.set_lr(lr_at(self.step, self.optim_cfg, self.run.max_steps))
        self.optimizer.step()
        self.optimizer.clear_grad(set_to_zero=False)
        self.timer.mark("update")
        self.timer.end_step()
        return loss_sum, count, norm

    def _want_share(self) -> bool:
        nxt = self.step + 1
        return nxt % self.run.log_every == 0 or nxt == (self.run.stop_after or self.run.max_steps)

    def _count_share(self, use_task: list[paddle.Tensor], parts: list[tuple[int, int, int, paddle.Tensor]]) -> None:
        """Tokens that chose their task expert (vs the shared one), per task and MoE block."""
        total = sum(n for _, _, n, _ in parts)
        for b, use in enumerate(use_task):
            u = use.numpy().reshape(total, -1)
            for t, off, n, _ in parts:
                self._share[t, b, 0] += float(u[off:off + n].sum())
                self._share[t, b, 1] += float(u[off:off + n].size)

    # ------------------------------------------------------------------ evaluation
    @paddle.no_grad()
    def evaluate(self, chunk: int = 256) -> dict[str, float]:
        """Held-out loss and accuracy of every task (the task's first rank evaluates it)."""
        T = len(self.tasks)
        table = np.zeros((T, 3))  # loss sum, correct, count
        self.model.eval()
        for t in self.hosted:
            if self.plan.owner(t) != self.rank:
                continue
            x, y = self.workload.eval_samples(t)
            for i in range(0, len(y), chunk):
                xb, yb = paddle.to_tensor(x[i:i + chunk]), paddle.to_tensor(y[i:i + chunk])
                out = self.model(xb, paddle.full([len(yb)], self.local_of[t], dtype="int32"))
                logits = self.model.head(t, out.cls)
                table[t, 0] += float(F.cross_entropy(logits, yb, reduction="sum"))
                table[t, 1] += float((logits.argmax(axis=-1) == yb).astype("float32").sum())
                table[t, 2] += len(yb)
        self.model.train()
        table = self.comm.all_reduce(table, self.world, what="evaluation")
        return {f"{key}/{spec.name}": table[t, col] / max(table[t, 2], 1)
                for t, spec in enumerate(self.tasks) for key, col in (("acc", 1), ("loss", 0))}

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict[str, Any]:
        run = self.run
        resumed = self.resume()
        self._event(event="start", step=self.step, resumed=resumed, world_size=self.world_size, plan=self.plan.to_dict(),
                    restart=int(os.environ.get("SEMOE_ELASTIC_RESTART", "0")))
        T = len(self.tasks)
        acc_loss, acc_count = np.zeros(T), np.zeros(T)
        end = run.stop_after or run.max_steps
        progress = Progress(self.step, end)
        last_eval: dict[str, float] = {}
        samples_per_step = np.array([t.batch_size for t in self.tasks], dtype=np.int64)
        if self.step >= end and run.stop_after:
            logger.info("already at step %d >= train.stop_after=%d: nothing to do", self.step, end)
        while self.step < end:
            loss_sum, count, norm = self.train_step()
            self.step += 1
            self.samples_seen += samples_per_step
            acc_loss += loss_sum
            acc_count += count
            if self.step % run.log_every == 0 or self.step == end:
                self._log(acc_loss, acc_count, norm, progress)
                acc_loss, acc_count = np.zeros(T), np.zeros(T)
            if self.step % run.eval_every == 0 or self.step == end:
                last_eval = self.evaluate()
                self.metrics.scalars(self.step, last_eval, prefix="val")
                if self.is_main:
                    logger.info("step %d: held-out %s", self.step, "  ".join(
                        f"{s.name} acc {last_eval[f'acc/{s.name}']:.3f}" for s in self.tasks))
            if run.save_every and self.step % run.save_every == 0 and self.step < end:
                self.save()
        if not last_eval:
            last_eval = self.evaluate()
        final = self.save()
        sha, _ = live_digest(self.named, self.plan, self.comm, self.world)
        summary = {
            "step": self.step,
            "world_size": self.world_size,
            "plan": self.plan.strategy,
            "hosted_by_rank": {r: [self.tasks[t].name for t in self.plan.rank_tasks(r)] for r in range(self.world_size)},
            "eval": last_eval,
            "param_sha256": sha,
            "checkpoint": str(final),
            "samples_seen": {s.name: int(n) for s, n in zip(self.tasks, self.samples_seen)},
        }
        if self.is_main:
            (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            if self.timing_rows:
                rows = np.concatenate(self.timing_rows, axis=1)
                np.savez(self.output_dir / "timings.npz", rows=rows, columns=np.array(COLUMNS))
            logger.info("done: %s", json.dumps(summary))
        self.metrics.close()
        return summary

    def _log(self, losses: np.ndarray, count: np.ndarray, norm: float, progress: Progress) -> None:
        """Metrics of the steps since the last call (``norm``: the last step's gradient norm)."""
        T = len(self.tasks)
        flat = np.concatenate([losses, count, self._share.reshape(-1)])
        sums = self.comm.all_reduce(flat, self.world, what="metrics")
        share = sums[2 * T:].reshape(self._share.shape)
        self._share[:] = 0.0
        rows = self.timer.take()
        gathered = self.comm.all_gather(rows.reshape(-1), self.world, "step timings").reshape(self.world_size, *rows.shape)
        dt, ds = progress.interval(self.step)
        if not self.is_main:
            return
        self.timing_rows.append(gathered)
        per_task_loss = sums[:T] / np.maximum(sums[T:2 * T], 1)
        objective = float(sum(s.loss_weight * per_task_loss[t] for t, s in enumerate(self.tasks)))
        summ = summarize_steps(gathered)
        n = max(gathered.shape[1], 1)
        total_samples = sum(s.batch_size for s in self.tasks) * ds
        values: dict[str, float] = {
            "loss": objective,
            "grad_norm": float(norm),
            "lr": lr_at(self.step - 1, self.optim_cfg, self.run.max_steps),
            "samples_per_s": total_samples / dt if dt > 0 else float("nan"),
            "samples_per_s_per_rank": total_samples / dt / self.world_size if dt > 0 else float("nan"),
            "step_s": float(summ["step_wall"][0]) / n,
        }
        for t, s in enumerate(self.tasks):
            values[f"loss/{s.name}"] = float(per_task_loss[t])
            values[f"samples_per_s/{s.name}"] = s.batch_size * ds / dt if dt > 0 else float("nan")
            for b in range(self._share.shape[1]):
                if share[t, b, 1] > 0:
                    values[f"task_expert_share/{s.name}/moe{b}"] = float(share[t, b, 0] / share[t, b, 1])
        for r in range(self.world_size):
            for key, col in (("busy_s", "busy_wall"), ("busy_cpu_s", "busy_cpu"),
                             ("idle_s", "idle_wall"), ("comm_s", "comm_wall")):
                values[f"{key}/rank{r}"] = float(summ[col][r]) / n
        self.metrics.scalars(self.step, values)
        logger.info(
            "step %d/%d | loss %.4f (%s) | %.1f samples/s (%.1f per rank) | busy ms [%s] idle ms [%s] | ETA %s",
            self.step, self.run.max_steps, objective,
            " ".join(f"{s.name} {per_task_loss[t]:.3f}" for t, s in enumerate(self.tasks)),
            values["samples_per_s"], values["samples_per_s_per_rank"],
            " ".join(f"{values[f'busy_s/rank{r}'] * 1e3:.0f}" for r in range(self.world_size)),
            " ".join(f"{values[f'idle_s/rank{r}'] * 1e3:.0f}" for r in range(self.world_size)),
            format_eta(progress.eta(self.step)),
        )
