"""Durable files and the checkpoint format: the lowest layer of the package.

* :mod:`~paddle_semoe.io.files`: atomic writes, directory fsync, SHA-256, file records and
  their verification;
* :mod:`~paddle_semoe.io.checkpoint`: the checkpoint directory (per-rank shards, manifest,
  atomic publication, ``latest``, resolving ``train.resume``);
* :mod:`~paddle_semoe.io.model_state`: what a GPT-MoE rank's shard holds, and restoring it
  onto any expert-parallel degree (resharding).

Training (:mod:`paddle_semoe.engine.checkpoint` writes checkpoints collectively), storage and
inference (export reads checkpoints) all build on it; it imports nothing above
:mod:`paddle_semoe.params`.
"""
