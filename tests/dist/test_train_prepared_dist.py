"""tools/train.py on prepared datasets (BPE tokens, two datasets blended), 2 CPU processes (EP=2):
kill + resume continues bit-identically, checkpoints carry the tokenizer, and bad data or a
tokenizer mismatch is refused by name."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from paddle_semoe.data import load_documents
from paddle_semoe.data.prepare import PrepareOptions, prepare_dataset
from paddle_semoe.data.subword import load_tokenizer_dir, sha256_file, train_byte_level_bpe
from tests.dist import train_runner as tr

CONFIG = Path(__file__).resolve().parents[1] / "assets" / "gpt_moe_test.yaml"
VOCAB = 512


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two prepared datasets sharing a 512-token BPE, and one with another tokenizer."""
    root = tmp_path_factory.mktemp("prepared")
    topics = [d.text for d in load_documents("pydoc_topics")]
    bpe = train_byte_level_bpe(iter(topics), VOCAB)
    other = train_byte_level_bpe(iter(topics[:30]), 400, name="other-bpe")
    (root / "a.txt").write_text("".join(topics[: len(topics) // 2]))
    (root / "b.txt").write_text("".join(topics[len(topics) // 2 :]))
    opts = PrepareOptions(doc_boundary="blank_line")
    for name, src, tok in (("a", "a.txt", bpe), ("b", "b.txt", bpe), ("c", "b.txt", other)):
        prepare_dataset([str(root / src)], root / name, tokenizer=tok, options=opts, progress=False)
    return root


def _datasets(root: Path, *names_weights) -> str:
    items = ", ".join(f"{{path: {root / n}, weight: {w}}}" for n, w in names_weights)
    return f"data.datasets=[{items}]"


def _common(data: Path) -> list[str]:
    return [f"model.vocab_size={VOCAB}", _datasets(data, ("a", 3.0), ("b", 1.0))]


def test_kill_then_resume_on_a_blend_of_prepared_datasets_is_bit_identical(data, tmp_path):
    common = _common(data) + ["train.max_steps=60", "train.save_every=4", "train.eval_every=1000"]
    ref_m, new_m, resumed_from = tr.kill_then_resume(2, CONFIG, common, tmp_path)
    assert min(new_m) == resumed_from + 1
    steps = list(range(resumed_from + 1, 15))
    assert len(steps) >= 3
    for s in steps:
        for key in ("loss", "lm_loss", "aux_loss", "grad_norm", "lr"):
            assert new_m[s][key] == ref_m[s][key], f"step {s} {key}: resumed {new_m[s][key]!r} != uninterrupted {ref_m[s][key]!r}"


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    work = tmp_path_factory.mktemp("run")
    res = tr.run(2, CONFIG, _common(data) + [f"train.output_dir={work}/a", "train.max_steps=4"], work)
    assert res.returncode == 0, res.output[-6000:]
    return work / "a" / "checkpoints" / "step_00000004"


def test_checkpoint_carries_the_tokenizer_with_its_hash(trained, data):
    manifest = json.loads((trained / "manifest.json").read_text())
    names = {f["name"]: f for f in manifest["files"]}
    tok_json = trained / "tokenizer" / "tokenizer.json"
    assert names["tokenizer/tokenizer.json"]["sha256"] == sha256_file(tok_json) == sha256_file(data / "a" / "tokenizer" / "tokenizer.json")
    assert "tokenizer/tokenizer_meta.json" in names
    res = tr.run(1, CONFIG, _common(data) + [f"train.output_dir={trained.parent.parent}/e", "parallel.ep_degree=1",
                                            f"train.resume={trained}"], trained.parent,
                 extra=["--eval_only", "--eval_text", str(data / "b.txt")], timeout_s=120)
    assert res.returncode == 0, res.output[-3000:]
    result = res.json_lines()[-1]
    assert result["step"] == 4
    # --eval_text encodes with the checkpoint's tokenizer and scores every full window
    tok = load_tokenizer_dir(trained / "tokenizer")
    text = (data / "b.txt").read_text()
    assert result["text"]["tokens"] == len(tok.encode(text)) + (tok.eos_id is not None)
    assert result["text"]["bytes"] == len(text.encode())
    assert 0.0 < result["text"]["loss"] < 1.5 * math.log(VOCAB)
    assert result["text"]["bits_per_byte"] == pytest.approx(
        result["text"]["loss"] / math.log(2) * result["text"]["tokens"] / result["text"]["bytes"])


def test_resume_on_data_with_another_tokenizer_is_refused_by_name(trained, data, tmp_path):
    res = tr.run(1, CONFIG, [f"model.vocab_size={VOCAB}", _datasets(data, ("c", 1.0)), f"train.output_dir={tmp_path}/x",
                             "parallel.ep_degree=1", f"train.resume={trained}"], tmp_path, timeout_s=120)
    assert res.returncode != 0
    assert "was trained with tokenizer 'bpe-512'" in res.output and "uses tokenizer 'other-bpe'" in res.output, res.output[-3000:]


def test_altered_shard_is_refused_at_train_time(data, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(data / "a", bad)
    shard = bad / "tokens_00000.bin"
    raw = bytearray(shard.read_bytes())
    raw[100] ^= 1
    shard.write_bytes(bytes(raw))
    res = tr.run(1, CONFIG, [f"model.vocab_size={VOCAB}", _datasets(tmp_path, ("bad", 1.0)), f"train.output_dir={tmp_path}/x",
                             "parallel.ep_degree=1"], tmp_path, timeout_s=120)
    assert res.returncode != 0
    assert f"dataset file {shard} is altered" in res.output, res.output[-3000:]


def test_tokenizer_larger_than_the_model_vocabulary_is_refused(data, tmp_path):
    res = tr.run(1, CONFIG, [_datasets(data, ("a", 1.0)), f"train.output_dir={tmp_path}/x", "parallel.ep_degree=1"],
                 tmp_path, timeout_s=120)
    assert res.returncode != 0
    assert "has 512 tokens, more than model.vocab_size=256" in res.output, res.output[-3000:]


def test_inference_package_carries_the_tokenizer_and_infer_decodes_with_it(trained, tmp_path):
    import subprocess
    import sys

    from paddle_semoe.inference.package import PackageError, read_manifest

    env = tr._env()
    pkg = tmp_path / "pkg"
    res = subprocess.run([sys.executable, str(tr.REPO / "tools" / "export.py"), "--checkpoint", str(trained), "--out", str(pkg),
                          "--no-graphs"], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert sha256_file(pkg / "tokenizer" / "tokenizer.json") == sha256_file(trained / "tokenizer" / "tokenizer.json")
    read_manifest(pkg)  # verifies the tokenizer files too
    res = subprocess.run([sys.executable, str(tr.REPO / "tools" / "infer.py"), "--package", str(pkg), "--prompt", "The import statement",
                          "--max-new-tokens", "4", "--modes", "resident", "--threads", "1"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    line = next(l for l in res.stdout.splitlines() if l.startswith("[0]"))
    assert line.startswith("[0] 'The import statement' -> '")
    tok = pkg / "tokenizer" / "tokenizer.json"
    tok.write_bytes(tok.read_bytes().replace(b'"<|endoftext|>"', b'"<|endoftexT|>"', 1))
    with pytest.raises(PackageError, match=r"tokenizer\.json"):
        read_manifest(pkg)
