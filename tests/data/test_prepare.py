"""tools/prepare_data.py and its library: round trip, manifest, tokenizers, and every bad input."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from paddle_semoe.data import DatasetError, PreparedDataset, load_tokenizer, token_dtype_for
from paddle_semoe.data.dataset import validation_mask
from paddle_semoe.data.prepare import InputError, PrepareOptions, expand_inputs, prepare_dataset
from paddle_semoe.data.subword import EOS_TOKEN, TokenizerError

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "prepare_data.py"


def _prepare(inputs, out, tok, **kw):
    return prepare_dataset([str(i) for i in inputs], out, tokenizer=tok, progress=False, **kw)


@pytest.fixture(scope="module")
def prepared(small_corpus, tmp_path_factory, bpe) -> Path:
    out = tmp_path_factory.mktemp("ds") / "ds"
    _prepare([small_corpus], out, bpe, options=PrepareOptions(shard_bytes=64 << 10))  # several shards
    return out


def _source_texts(corpus: Path) -> list[str]:
    """The documents in prepare's order: directory walk (root files first, then sub-dirs)."""
    texts = []
    for line in (corpus / "more.jsonl").read_text(encoding="utf-8").splitlines():
        texts.append(json.loads(line)["text"])
    for path in sorted((corpus / "txt").iterdir()):
        texts.append(path.read_text(encoding="utf-8"))
    return texts


def test_round_trip_decode_encode_is_exact(prepared, small_corpus, bpe):
    ds = PreparedDataset(prepared)
    tok = ds.load_tokenizer()
    assert tok.sha256 == bpe.sha256 and tok.eos_id == 0
    texts = _source_texts(small_corpus)
    assert ds.num_documents == len(texts)
    for doc, text in zip(ds.documents(), texts):
        assert doc[-1] == tok.eos_id  # every document ends with EOS
        assert tok.decode(doc[:-1].tolist()) == text
    # byte-level BPE is lossless on arbitrary text
    for s in ["", " leading", "tabs\tand\r\nCRLF", "emoji 😀 and \x00 NUL", "ünï  \n\n\n  x"]:
        assert bpe.decode(bpe.encode(s)) == s


def test_manifest_records_sources_counts_shards_and_tokenizer(prepared, small_corpus, bpe):
    m = json.loads((prepared / "manifest.json").read_text())
    assert m["dtype"] == "<u2" and m["num_documents"] == 79
    files = expand_inputs([str(small_corpus)])
    assert [s["path"] for s in m["sources"]] == [str(p) for p in files]
    for src, path in zip(m["sources"], files):
        data = path.read_bytes()
        assert src["bytes"] == len(data) and src["sha256"] == hashlib.sha256(data).hexdigest()
    assert sum(s["tokens"] for s in m["sources"]) == m["num_tokens"]
    assert sum(s["documents"] for s in m["sources"]) == m["num_documents"]
    assert len(m["shards"]) > 3 and sum(s["tokens"] for s in m["shards"]) == m["num_tokens"]
    for shard in m["shards"]:
        raw = (prepared / shard["name"]).read_bytes()
        assert len(raw) == shard["bytes"] == 2 * shard["tokens"]
        assert hashlib.sha256(raw).hexdigest() == shard["sha256"]
    assert m["tokenizer"]["sha256"] == bpe.sha256 and m["tokenizer"]["vocab_size"] == 512
    offsets = np.fromfile(prepared / "doc_offsets.bin", dtype="<i8")
    assert offsets[0] == 0 and offsets[-1] == m["num_tokens"] and np.all(np.diff(offsets) > 0)


def test_token_view_take_matches_the_stream(prepared):
    ds = PreparedDataset(prepared)
    stream = np.concatenate(list(ds.documents()))
    whole = ds.tokens()
    idx = np.random.default_rng(0).integers(0, ds.num_tokens, size=(7, 33))
    np.testing.assert_array_equal(whole.take(idx), stream[idx])
    train, val = ds.split(0.1)
    mask = validation_mask(ds.num_documents, 0.1)
    docs = list(ds.documents())
    np.testing.assert_array_equal(np.concatenate(list(train.iter_chunks(1000))), np.concatenate([d for d, v in zip(docs, mask) if not v]))
    np.testing.assert_array_equal(val[0 : val.size], np.concatenate([d for d, v in zip(docs, mask) if v]))
    assert train.size + val.size == ds.num_tokens


def test_validation_split_is_by_whole_spread_documents():
    mask = validation_mask(200, 0.05)
    assert mask.sum() == 10 and np.all(np.diff(np.nonzero(mask)[0]) == 20)
    assert validation_mask(3, 0.05).sum() == 1
    with pytest.raises(DatasetError, match="at least 2 documents"):
        validation_mask(1, 0.05)


def test_dtype_is_uint16_when_the_vocabulary_fits_else_uint32(tmp_path):
    assert token_dtype_for(65536) == np.dtype("<u2") and token_dtype_for(65537) == np.dtype("<u4")
    import tokenizers

    vocab = {f"w{i}": i for i in range(70_000)}
    vocab["[UNK]"] = 70_000
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "in.txt").write_text("w1 w69999 w5\n\nw68000 nope\n")
    out = tmp_path / "ds"
    _prepare([tmp_path / "in.txt"], out, load_tokenizer(tmp_path / "tokenizer.json"), options=PrepareOptions(doc_boundary="blank_line"))
    ds = PreparedDataset(out)
    assert ds.dtype == np.dtype("<u4") and ds.num_documents == 2
    np.testing.assert_array_equal(ds.tokens()[0 : ds.num_tokens], [1, 69999, 5, 68000, 70000])


def test_paddlenlp_style_directories_and_sentencepiece(tmp_path, bpe, topic_texts):
    sample = topic_texts[3][:2000]
    # vocab.json + merges.txt + tokenizer_config.json (GPT-2 style PaddleNLP / PaddleFormers directory)
    d = tmp_path / "gpt_style"
    d.mkdir()
    bpe._tok.model.save(str(d))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": EOS_TOKEN}, "tokenizer_class": "GPTTokenizer"}))
    (d / "vocab.json").write_text(json.dumps({**json.loads((d / "vocab.json").read_text()), EOS_TOKEN: 0}))
    tok = load_tokenizer(d)
    assert tok.encode(sample) == bpe.encode(sample) and tok.decode(tok.encode(sample)) == sample
    # a directory with tokenizer.json
    d2 = tmp_path / "hf_style"
    d2.mkdir()
    (d2 / "tokenizer.json").write_bytes(bpe._json)
    assert load_tokenizer(d2).sha256 == bpe.sha256
    # SentencePiece, trained here (nothing downloaded), in a directory as tokenizer.model
    import sentencepiece as spm

    (tmp_path / "sp_train.txt").write_text("".join(topic_texts[:40]))
    d3 = tmp_path / "sp_style"
    d3.mkdir()
    spm.SentencePieceTrainer.train(
        input=str(tmp_path / "sp_train.txt"), model_prefix=str(d3 / "tokenizer"), vocab_size=400, model_type="bpe",
        minloglevel=2, num_threads=1,
    )
    sp = load_tokenizer(d3)
    assert sp.kind == "sentencepiece" and sp.vocab_size == 400 and sp.eos_id == 2
    out = tmp_path / "ds_sp"
    (tmp_path / "in.txt").write_text(sample)
    _prepare([tmp_path / "in.txt"], out, sp)
    ds = PreparedDataset(out)
    doc = next(ds.documents())
    assert doc[-1] == 2 and sp.decode(doc[:-1].tolist()).split() == sample.split()
    assert ds.load_tokenizer().sha256 == sp.sha256
    with pytest.raises(TokenizerError, match="holds none of"):
        (tmp_path / "empty_tok").mkdir()
        load_tokenizer(tmp_path / "empty_tok")


def test_inputs_by_glob_and_directory(small_corpus):
    by_glob = expand_inputs([str(small_corpus / "txt" / "doc00*.txt")])
    assert [p.name for p in by_glob] == [f"doc{i:03d}.txt" for i in range(10)]
    both = expand_inputs([str(small_corpus / "txt"), str(small_corpus / "txt" / "doc001.txt")])
    assert len(both) == len(list((small_corpus / "txt").iterdir()))  # de-duplicated
    with pytest.raises(InputError, match="matches no files"):
        expand_inputs([str(small_corpus / "*.nothing")])
    with pytest.raises(InputError, match="input not found"):
        expand_inputs([str(small_corpus / "missing.txt")])


# ----------------------------------------------------------------------------- bad input
def test_empty_file_is_refused_by_name_or_skipped(tmp_path, bpe):
    (tmp_path / "a.txt").write_text("some text\n")
    (tmp_path / "b.txt").write_bytes(b"")
    with pytest.raises(InputError, match=r"b\.txt is empty \(0 bytes\)"):
        _prepare([tmp_path / "a.txt", tmp_path / "b.txt"], tmp_path / "out", bpe)
    assert not (tmp_path / "out").exists()
    res = _prepare([tmp_path / "a.txt", tmp_path / "b.txt"], tmp_path / "out", bpe, options=PrepareOptions(skip_empty=True))
    assert res.manifest["num_documents"] == 1


def test_undecodable_bytes_name_the_file_and_offset_or_are_replaced(tmp_path, bpe):
    data = ("x" * 5000).encode() + "é".encode() + b"abc\xff\xfedef" + b"y" * 10
    (tmp_path / "bad.txt").write_bytes(data)
    with pytest.raises(InputError, match=r"bad\.txt: undecodable UTF-8 at byte offset 5005 .*--errors replace"):
        _prepare([tmp_path / "bad.txt"], tmp_path / "out", bpe)
    res = _prepare([tmp_path / "bad.txt"], tmp_path / "out", bpe, options=PrepareOptions(errors="replace"))
    ds = PreparedDataset(res.path)
    assert bpe.decode(next(ds.documents())[:-1].tolist()) == data.decode("utf-8", errors="replace")


def test_utf8_sequence_split_across_read_chunks_is_decoded(tmp_path, bpe, monkeypatch):
    import paddle_semoe.data.prepare as prep

    monkeypatch.setattr(prep, "_READ_CHUNK", 7)
    text = "aé😀b" * 50 + "\nend"
    (tmp_path / "u.txt").write_text(text)
    res = _prepare([tmp_path / "u.txt"], tmp_path / "out", bpe)
    assert bpe.decode(next(PreparedDataset(res.path).documents())[:-1].tolist()) == text
    (tmp_path / "t.txt").write_bytes(text.encode()[:-1] + b"\xe2\x82")  # truncated 3-byte sequence at EOF
    with pytest.raises(InputError, match=rf"t\.txt: undecodable UTF-8 at byte offset {len(text.encode()) - 1}"):
        _prepare([tmp_path / "t.txt"], tmp_path / "out2", bpe)


@pytest.mark.parametrize(
    "lines, pattern",
    [
        (['{"text": "a"}', '{"text": "b"', '{"text": "c"}'], r"in\.jsonl:2: malformed JSON line"),
        (['{"text": "a"}', '{"body": "b", "id": 3}'], r"in\.jsonl:2: no field 'text' \(the object has: body, id\)"),
        (['{"text": "a"}', '["text"]'], r"in\.jsonl:2: expected a JSON object"),
        (['{"text": 5}'], r"in\.jsonl:1: field 'text' is a int"),
    ],
)
def test_bad_json_lines_name_file_and_line(tmp_path, bpe, lines, pattern):
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=pattern):
        _prepare([tmp_path / "in.jsonl"], tmp_path / "out", bpe)


def test_nested_json_field(tmp_path, bpe):
    (tmp_path / "in.jsonl").write_text('{"doc": {"body": "first"}}\n\n{"doc": {"body": "second one"}}\n')
    res = _prepare([tmp_path / "in.jsonl"], tmp_path / "out", bpe, options=PrepareOptions(field="doc.body"))
    docs = [bpe.decode(d[:-1].tolist()) for d in PreparedDataset(res.path).documents()]
    assert docs == ["first", "second one"]


def test_output_holding_a_different_dataset_is_refused_then_replaced_with_overwrite(tmp_path, bpe):
    (tmp_path / "a.txt").write_text("alpha text one\n")
    (tmp_path / "b.txt").write_text("beta text two\n")
    out = tmp_path / "ds"
    first = _prepare([tmp_path / "a.txt"], out, bpe)
    # the same request again: left unchanged
    again = _prepare([tmp_path / "a.txt"], out, bpe)
    assert again.unchanged and again.manifest["fingerprint"] == first.manifest["fingerprint"]
    with pytest.raises(InputError, match="already holds a different dataset .*--overwrite"):
        _prepare([tmp_path / "b.txt"], out, bpe)
    assert PreparedDataset(out).fingerprint == first.manifest["fingerprint"]  # untouched
    second = _prepare([tmp_path / "b.txt"], out, bpe, overwrite=True)
    assert PreparedDataset(out).fingerprint == second.manifest["fingerprint"] != first.manifest["fingerprint"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt", "ds"]  # no temp dirs left
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep me")
    with pytest.raises(InputError, match="holds no prepared dataset"):
        _prepare([tmp_path / "a.txt"], other, bpe, overwrite=True)
    assert (other / "mine.txt").read_text() == "keep me"


def test_truncated_or_altered_shard_is_refused_by_name(prepared, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(prepared, bad)
    shard = bad / "tokens_00001.bin"
    raw = shard.read_bytes()
    shard.write_bytes(raw[:-2])
    with pytest.raises(DatasetError, match=r"tokens_00001\.bin is truncated or altered"):
        PreparedDataset(bad)
    shard.write_bytes(raw[:-2] + b"\x01\x00" if raw[-2:] != b"\x01\x00" else raw[:-2] + b"\x02\x00")
    with pytest.raises(DatasetError, match=r"tokens_00001\.bin is altered: SHA-256"):
        PreparedDataset(bad)
    shard.unlink()
    with pytest.raises(DatasetError, match=r"file tokens_00001\.bin is missing"):
        PreparedDataset(bad)
    with pytest.raises(DatasetError, match="not a prepared dataset"):
        PreparedDataset(tmp_path)


def test_cli_prints_one_line_errors_and_prepares(tmp_path, small_corpus):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    (tmp_path / "in.jsonl").write_text('{"text": "ok"}\n{"txt": "x"}\n')
    bad = subprocess.run(
        [sys.executable, str(TOOL), "-i", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "o"), "--bpe_vocab_size", "300"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'in.jsonl'}:2: no field 'text' (the object has: txt); choose one with --field"
    ok = subprocess.run(
        [sys.executable, str(TOOL), "-i", str(small_corpus / "txt" / "doc01*.txt"), "-o", str(tmp_path / "o"), "--bpe_vocab_size", "300"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert ok.returncode == 0, ok.stderr[-2000:]
    summary = json.loads(ok.stdout.strip().splitlines()[-1])
    assert summary["num_documents"] == 10 and summary["vocab_size"] == 300 and summary["dtype"] == "<u2"
    assert "tokenize [" in ok.stderr and "MB/s" in ok.stderr and "ETA" in ok.stderr  # the progress bar


@pytest.mark.parametrize("boundary", ["file", "blank_line", "line"])
def test_documents_longer_than_a_piece_stay_whole(tmp_path, bpe, monkeypatch, boundary):
    import paddle_semoe.data.prepare as prep

    monkeypatch.setattr(prep, "_PIECE_CHARS", 40)  # force long documents through the piece path
    paragraphs = ["alpha beta gamma delta\n" * 5, "one line only\n", "x" * 100 + "\n" + "y" * 90 + "\n"]
    (tmp_path / "p.txt").write_text("\n\n".join(paragraphs) + "\n")
    res = _prepare([tmp_path / "p.txt"], tmp_path / "out", bpe, options=PrepareOptions(doc_boundary=boundary))
    docs = [bpe.decode(d[:-1].tolist()) for d in PreparedDataset(res.path).documents()]
    text = (tmp_path / "p.txt").read_text()
    if boundary == "file":
        assert docs == [text]
    elif boundary == "blank_line":
        assert docs == paragraphs
    else:
        assert docs == [line for line in text.splitlines() if line.strip()]


def _mapped_kib(path: Path) -> int:
    """Resident KiB of this process's mappings of ``path`` (/proc/self/smaps)."""
    total, current = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if line[:1].isdigit() or line[:1] in "abcdef" and "-" in line.split(" ")[0]:
            current = line.rstrip().endswith(str(path))
        elif current and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


def test_reading_windows_leaves_no_shard_pages_mapped(prepared):
    ds = PreparedDataset(prepared)
    view = ds.tokens()
    rng = np.random.default_rng(1)
    for _ in range(200):
        view.take(rng.integers(0, ds.num_tokens - 65, size=(16, 1)) + np.arange(65))
    mapped = sum(_mapped_kib((prepared / s["name"]).resolve()) for s in ds.manifest["shards"])
    assert mapped == 0, f"{mapped} KiB of shard pages still mapped after 3200 windows"


def test_encode_text_files_for_evaluation(tmp_path, bpe):
    from paddle_semoe.data import TokenizerError, encode_text_files

    (tmp_path / "a.txt").write_text("def f(x):\n    return x\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("naïve café ✓\n", encoding="utf-8")
    ids, n_bytes = encode_text_files(bpe, [tmp_path / "a.txt", tmp_path / "b.txt"])
    eos = [] if bpe.eos_id is None else [bpe.eos_id]
    expect = bpe.encode("def f(x):\n    return x\n") + eos + bpe.encode("naïve café ✓\n") + eos
    assert ids.dtype == np.int64 and ids.tolist() == expect
    assert n_bytes == len("def f(x):\n    return x\n".encode()) + len("naïve café ✓\n".encode())
    (tmp_path / "bad.txt").write_bytes(b"ok so far \xff\xfe")
    with pytest.raises(TokenizerError, match=r"bad.txt: undecodable UTF-8 at byte offset 10"):
        encode_text_files(bpe, [tmp_path / "bad.txt"])
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(TokenizerError, match="empty.txt: the file holds no text"):
        encode_text_files(bpe, [tmp_path / "empty.txt"])
    with pytest.raises(TokenizerError, match="missing.txt: no such text file"):
        encode_text_files(bpe, [tmp_path / "missing.txt"])
