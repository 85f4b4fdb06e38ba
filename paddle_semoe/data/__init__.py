"""Offline text data for the GPT-MoE language model: corpus, byte tokenizer, batch loader.

::

    from paddle_semoe.data import ByteTokenizer, TokenBatcher, load_split, val_batches

    split = load_split("python_docs")                    # uint8 arrays + sha256 of the corpus
    batcher = TokenBatcher(split.train, global_batch_size=32, seq_len=128,
                           seed=cfg.seed, rank=dp_rank, world_size=dp_world)
    batcher.load_state_dict(ckpt["data"])                # exact resume (optional)
    for step, batch in zip(range(start_step, max_steps), batcher):   # int64[B, 129]
        x = paddle.to_tensor(batch[:, :-1]); y = paddle.to_tensor(batch[:, 1:])
"""

from .corpus import CorpusSplit, Document, corpus_names, expected_sha256, load_corpus, load_documents, load_split
from .loader import TokenBatcher, split_inputs_targets, val_batches
from .tokenizer import ByteTokenizer, unigram_cross_entropy_nats, unigram_entropy_nats

__all__ = [
    "ByteTokenizer",
    "CorpusSplit",
    "Document",
    "TokenBatcher",
    "corpus_names",
    "expected_sha256",
    "load_corpus",
    "load_documents",
    "load_split",
    "split_inputs_targets",
    "unigram_cross_entropy_nats",
    "unigram_entropy_nats",
    "val_batches",
]
