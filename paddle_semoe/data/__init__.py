"""Text data for the GPT-MoE language model: built-in corpora, prepared datasets, tokenizers, batchers.

Zero-setup default, the built-in Python-documentation corpus through the byte tokenizer::

    from paddle_semoe.data import load_training_split

    split = load_training_split("python_docs", val_fraction=0.05)        # CorpusSplit
    batcher = split.batcher(32, 128, seed=cfg.seed, rank=dp_rank, world_size=dp_world)
    batcher.load_state_dict(ckpt["data"])                # exact resume (optional)
    for step, batch in zip(range(start_step, max_steps), batcher):   # int64[B, 129]
        x = paddle.to_tensor(batch[:, :-1]); y = paddle.to_tensor(batch[:, 1:])

Your own text: ``tools/prepare_data.py`` writes a prepared dataset (:mod:`.prepare`,
:mod:`.dataset`), and ``load_training_split(datasets=[(path, weight), ...])`` blends several,
memory-mapped (:mod:`.blend`); the tokenizer (:mod:`.subword`) travels with the checkpoints.
"""

from typing import Optional, Sequence, Tuple, Union

from .blend import BlendedBatcher, ConcatView, DatasetsSplit, check_tokenizer_on_resume, check_weights
from .corpus import (
    BYTE_TOKENIZER_IDENTITY,
    CorpusSplit,
    Document,
    corpus_names,
    expected_sha256,
    load_corpus,
    load_documents,
    load_split,
)
from .dataset import DatasetError, PreparedDataset, TokenView, token_dtype_for
from .loader import TokenBatcher, split_inputs_targets, val_batches
from .subword import (
    ByteTextTokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
    TextTokenizer,
    TokenizerError,
    copy_tokenizer_files,
    encode_text_files,
    load_tokenizer,
    load_tokenizer_dir,
    model_tokenizer,
    train_byte_level_bpe,
)
from .tokenizer import ByteTokenizer, unigram_cross_entropy_nats, unigram_entropy_nats


def load_training_split(
    corpus: str = "python_docs",
    val_fraction: float = 0.05,
    datasets: Optional[Sequence[Tuple[str, float]]] = None,
    vocab_size: Optional[int] = None,
    verify: str = "full",
) -> Union[CorpusSplit, DatasetsSplit]:
    """The training data of a job: prepared ``datasets`` ``[(path, weight), ...]`` when given,
    else the built-in ``corpus``. Both results offer ``train``, ``val``, ``sha256``,
    ``unigram_baseline(vocab)``, ``batcher(...)``, ``tokenizer_identity()`` and
    ``tokenizer_files()``. ``verify``: ``"full"`` (SHA-256 of every dataset file) or ``"size"``.

    Raises:
        DatasetError / ValueError: see :class:`DatasetsSplit` and :func:`load_split`.
    """
    if datasets:
        if vocab_size is None:
            raise ValueError("vocab_size (the model's) is needed to check the datasets' tokenizer")
        return DatasetsSplit(datasets, val_fraction, vocab_size, verify=verify)
    return load_split(corpus, val_fraction)


__all__ = [
    "BYTE_TOKENIZER_IDENTITY",
    "BlendedBatcher",
    "ByteTextTokenizer",
    "ByteTokenizer",
    "ConcatView",
    "CorpusSplit",
    "DatasetError",
    "DatasetsSplit",
    "Document",
    "HFTokenizer",
    "PreparedDataset",
    "SentencePieceTokenizer",
    "TextTokenizer",
    "TokenBatcher",
    "TokenView",
    "TokenizerError",
    "check_tokenizer_on_resume",
    "check_weights",
    "copy_tokenizer_files",
    "encode_text_files",
    "corpus_names",
    "expected_sha256",
    "load_corpus",
    "load_documents",
    "load_split",
    "load_tokenizer",
    "load_tokenizer_dir",
    "load_training_split",
    "model_tokenizer",
    "split_inputs_targets",
    "token_dtype_for",
    "train_byte_level_bpe",
    "unigram_cross_entropy_nats",
    "unigram_entropy_nats",
    "val_batches",
]
