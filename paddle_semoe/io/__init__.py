"""Durable files and the checkpoint format, the lowest layer of the package: atomic writes and
checksummed file records (:mod:`.files`), the checkpoint directory (:mod:`.checkpoint`), and what
a GPT-MoE rank's shard holds, restorable onto any expert-parallel degree (:mod:`.model_state`).
Training, storage and inference build on it; it imports nothing above :mod:`paddle_semoe.params`.
"""
