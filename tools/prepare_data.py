#!/usr/bin/env python
"""Tokenize text files into a prepared dataset for tools/train.py (data.datasets).

    # train a byte-level BPE of 8192 tokens on the inputs, then tokenize them
    python tools/prepare_data.py --input docs/ --input 'notes/**/*.txt' --output data/mycorpus --bpe_vocab_size 8192
    # JSON lines with the text in field "text", an existing tokenizer
    python tools/prepare_data.py --input corpus.jsonl --field text --tokenizer tokenizer.json --output data/web
    python tools/prepare_data.py --input corpus.txt --tokenizer path/to/paddlenlp_tokenizer_dir --output data/c

Inputs: files, directories (recursive), glob patterns and built-in corpora (builtin:python_docs); ``.jsonl``/``.ndjson`` files are read
as JSON lines (``--format`` forces one). Text files are one document each (``--doc_boundary``
``blank_line`` or ``line`` splits them). Tokenizers: ``--bpe_vocab_size N`` trains a byte-level
BPE here; ``--tokenizer`` loads a tokenizer.json, a SentencePiece .model, or a
PaddleFormers/PaddleNLP tokenizer directory (nothing is downloaded).

Output (see paddle_semoe/data/dataset.py): token shards (uint16 if the vocabulary fits, else
uint32), a document index and a manifest with source SHA-256s and the tokenizer's hash. The
output is written atomically; a directory holding a different dataset is refused unless
--overwrite. Exit status: 0 done, 2 bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().rstrip("b")
    mult = units.get(t[-1:], 1)
    return int(float(t[:-1] if t[-1:] in units else t) * mult)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", "-i", action="append", required=True, help="a file, directory or glob (repeatable)")
    p.add_argument("--output", "-o", type=Path, required=True, help="the dataset directory to write")
    tok = p.add_mutually_exclusive_group(required=True)
    tok.add_argument("--bpe_vocab_size", type=int, help="train a byte-level BPE of this vocabulary size on the inputs")
    tok.add_argument("--tokenizer", type=Path, help="tokenizer.json, SentencePiece .model, or a tokenizer directory")
    p.add_argument("--bpe_train_bytes", type=_size, default=512 << 20, help="train the BPE on at most this many leading bytes (default 512M)")
    p.add_argument("--format", choices=("auto", "text", "jsonl"), default="auto", dest="input_format")
    p.add_argument("--field", default="text", help="JSON-lines field holding the text (dotted for nested: a.b)")
    p.add_argument("--doc_boundary", choices=("file", "blank_line", "line"), default="file", help="documents in text files")
    p.add_argument("--errors", choices=("strict", "replace"), default="strict", help="undecodable UTF-8: stop (default) or replace")
    p.add_argument("--skip_empty", action="store_true", help="skip empty files instead of stopping")
    p.add_argument("--no_eos", action="store_true", help="do not end documents with the tokenizer's EOS token")
    p.add_argument("--shard_size", type=_size, default=256 << 20, help="bytes per token shard (default 256M)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing different dataset in --output (atomically)")
    p.add_argument("--threads", type=int, default=None, help="encoder threads (default: all cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = args.threads or os.cpu_count() or 1
    os.environ.setdefault("RAYON_NUM_THREADS", str(threads))  # tokenizers' encode_batch / BPE training
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    log = logging.getLogger("prepare_data")

    from paddle_semoe.data.dataset import dataset_summary
    from paddle_semoe.data.prepare import InputError, PrepareOptions, prepare_dataset
    from paddle_semoe.data.subword import TokenizerError, load_tokenizer

    try:
        opts = PrepareOptions(
            input_format=args.input_format, field=args.field, doc_boundary=args.doc_boundary, errors=args.errors,
            skip_empty=args.skip_empty, append_eos=not args.no_eos, shard_bytes=args.shard_size,
        )
        tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer is not None else None
        result = prepare_dataset(
            args.input, args.output, tokenizer=tokenizer, bpe_vocab_size=args.bpe_vocab_size,
            bpe_train_bytes=args.bpe_train_bytes, options=opts, overwrite=args.overwrite, progress=not args.quiet,
        )
    except (InputError, TokenizerError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    m = result.manifest
    if result.unchanged:
        log.info("%s already holds this dataset: nothing to do", args.output)
    log.info("%s: %s", args.output, dataset_summary(m))
    print(json.dumps({"output": str(args.output), "fingerprint": m["fingerprint"], "num_documents": m["num_documents"],
                      "num_tokens": m["num_tokens"], "dtype": m["dtype"], "tokenizer": m["tokenizer"]["name"],
                      "vocab_size": m["tokenizer"]["vocab_size"], "unchanged": result.unchanged,
                      **{k: round(v, 3) for k, v in result.stats.items()}}))
    return 0


if __name__ == "__main__":
    from paddle_semoe.engine.launch_env import run_entry

    sys.exit(run_entry(main, name="prepare_data"))
