"""Export never deletes what it did not create, publishes atomically, and every file of a
package (static graphs included) is verified before use."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import paddle
import pytest

from paddle_semoe.inference import export as export_mod
from paddle_semoe.inference.export import export_package
from paddle_semoe.inference.package import PackageError, read_manifest
from paddle_semoe.models.gpt import GPTConfig, GPTMoE, MoESettings

ROOT = Path(__file__).resolve().parents[2]


def _tiny() -> GPTMoE:
    paddle.seed(3)
    return GPTMoE(GPTConfig(d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=16, moe_every=1,
                            moe=MoESettings(num_experts=2, top_k=1)))


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _tree(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def graph_package(tmp_path_factory) -> Path:
    return export_package(_tiny(), tmp_path_factory.mktemp("pkg") / "pkg", graphs=True)


def test_refuses_a_non_empty_directory_that_is_not_a_package_and_leaves_it_alone(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000010").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    (run / "checkpoints" / "step_00000010" / "rank_00000.npz").write_bytes(b"weights")
    before = _tree(run)
    with pytest.raises(PackageError, match="not an inference package: refusing"):
        export_package(_tiny(), run, graphs=False)
    assert _tree(run) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no temp directory left


def test_cli_refuses_a_run_directory_in_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("{}\n")
    rc = _tool("export").main(["--fresh", "-c", str(ROOT / "configs" / "gpt_moe_tiny.yaml"), "--out", str(run),
                               "--no-graphs"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: --out") and "not an inference package" in err[0]
    assert (run / "metrics.jsonl").read_text() == "{}\n"


def test_earlier_package_is_replaced_only_with_overwrite(tmp_path):
    out = export_package(_tiny(), tmp_path / "pkg", graphs=False)
    first = _tree(out)
    with pytest.raises(PackageError, match="--overwrite"):
        export_package(_tiny(), out, graphs=False)
    assert _tree(out) == first
    model = _tiny()
    for p in model.parameters():
        p.set_value(p + 1.0)
    export_package(model, out, graphs=False, overwrite=True)
    assert _tree(out) != first
    read_manifest(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]
    export_package(_tiny(), tmp_path / "empty_dir_ok", graphs=False)  # a new directory is fine
    (tmp_path / "empty").mkdir()
    export_package(_tiny(), tmp_path / "empty", graphs=False)  # so is an empty one


def test_failed_export_keeps_the_old_package_and_removes_its_temp_dir(tmp_path, monkeypatch):
    out = export_package(_tiny(), tmp_path / "pkg", graphs=False)
    before = _tree(out)

    def fail(*_a, **_k):
        raise OSError(28, "No space left on device", str(out))

    monkeypatch.setattr(export_mod, "write_manifest", fail)
    with pytest.raises(OSError, match="No space left"):
        export_package(_tiny(), out, graphs=False, overwrite=True)
    assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]
    read_manifest(out)


def test_every_file_is_in_the_manifest(graph_package):
    doc = json.loads((graph_package / "manifest.json").read_text())
    recorded = {doc["dense"]["file"], *(s["file"] for s in doc["sections"]), *(f["name"] for f in doc["files"])}
    on_disk = set(_tree(graph_package)) - {"manifest.json"}
    assert on_disk == recorded
    assert any(n.endswith(".pdiparams") for n in recorded)


@pytest.mark.parametrize("suffix", [".pdiparams", ".json"])
def test_corrupt_graph_file_is_refused_by_name(graph_package, tmp_path, suffix):
    pkg = tmp_path / "pkg"
    shutil.copytree(graph_package, pkg)
    victim = next(p for p in sorted((pkg / "graphs").iterdir()) if p.name.endswith(suffix))
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(PackageError, match=f"{victim.name} is corrupt"):
        read_manifest(pkg)


def test_package_with_unrecorded_graphs_is_refused(graph_package, tmp_path):
    pkg = tmp_path / "pkg"
    shutil.copytree(graph_package, pkg)
    doc = json.loads((pkg / "manifest.json").read_text())
    doc["files"] = [f for f in doc["files"] if not f["name"].startswith("graphs/")]  # as an older export wrote it
    (pkg / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(PackageError, match="no checksum for the static graph graphs/embed"):
        read_manifest(pkg)


@pytest.mark.parametrize("drop", ["sections", "model.vocab_size", "dense"])
def test_manifest_missing_a_key_is_one_package_error(graph_package, tmp_path, drop):
    pkg = tmp_path / "pkg"
    shutil.copytree(graph_package, pkg)
    doc = json.loads((pkg / "manifest.json").read_text())
    head, _, tail = drop.partition(".")
    del (doc[head] if tail else doc)[tail or head]
    (pkg / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(PackageError, match="missing or has a malformed entry"):
        read_manifest(pkg)
