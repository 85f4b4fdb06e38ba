"""Checkpoint files: round trip, verification, atomic publication, resolution."""

import numpy as np
import pytest

from paddle_semoe.io import checkpoint as ck


def _write(tmp_path, step=3, world=2):
    d = tmp_path / (ck.step_dir_name(step) + ".tmp")
    d.mkdir(parents=True)
    recs = [ck.save_shard(d / ck.shard_name(r), {"param/w": np.full((2, 3), r, np.float32)}, {"rank": r}) for r in range(world)]
    ck.write_manifest(d, step, world, recs, {"ep_degree": world})
    final = tmp_path / ck.step_dir_name(step)
    ck.publish(d, final, keep=2)
    return final


def test_round_trip_and_latest(tmp_path):
    final = _write(tmp_path)
    m = ck.read_manifest(final)
    assert m.step == 3 and m.world_size == 2 and m.meta["ep_degree"] == 2
    t, meta = m.shard(1)
    assert meta == {"rank": 1}
    np.testing.assert_array_equal(t["param/w"], np.full((2, 3), 1, np.float32))
    assert ck.resolve_checkpoint("auto", tmp_path) == final
    assert ck.resolve_checkpoint(None, tmp_path) is None
    assert ck.resolve_checkpoint("auto", tmp_path / "empty") is None


def test_truncated_corrupt_and_missing_files_are_named(tmp_path):
    final = _write(tmp_path)
    shard = final / "rank_00001.npz"
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])
    with pytest.raises(ck.CheckpointError, match="rank_00001.npz is truncated"):
        ck.read_manifest(final)
    shard.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(ck.CheckpointError, match="rank_00001.npz is corrupt"):
        ck.read_manifest(final)
    shard.unlink()
    with pytest.raises(ck.CheckpointError, match="missing: .*rank_00001.npz"):
        ck.read_manifest(final)


def test_incomplete_checkpoint_has_no_manifest(tmp_path):
    d = tmp_path / "step_00000009.tmp"
    d.mkdir()
    ck.save_shard(d / ck.shard_name(0), {"a": np.zeros(3)}, {})
    with pytest.raises(ck.CheckpointError, match="no manifest.json: it is incomplete"):
        ck.read_manifest(d)
    with pytest.raises(ck.CheckpointError, match="not found"):
        ck.resolve_checkpoint(str(tmp_path / "nope"), tmp_path)


def test_not_a_shard_and_reserved_names(tmp_path):
    p = tmp_path / "x.npz"
    np.savez(p, a=np.zeros(2))
    with pytest.raises(ck.CheckpointError, match="no metadata"):
        ck.load_shard(p)
    (tmp_path / "y.npz").write_bytes(b"garbage")
    with pytest.raises(ck.CheckpointError, match="cannot be read"):
        ck.load_shard(tmp_path / "y.npz")
    with pytest.raises(ValueError, match="reserved"):
        ck.save_shard(tmp_path / "z.npz", {"__meta__": np.zeros(1)}, {})


def test_publish_keeps_the_newest_and_never_leaves_partial_dirs(tmp_path):
    for step in (1, 2, 3):
        _write(tmp_path, step=step)
    names = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert names == ["step_00000002", "step_00000003"]
    assert (tmp_path / "latest").read_text().strip() == "step_00000003"
    # a crash while writing step 4 leaves only a .tmp dir; "auto" still finds step 3
    (tmp_path / "step_00000004.tmp").mkdir()
    assert ck.resolve_checkpoint("auto", tmp_path).name == "step_00000003"


def test_collective_writer_gathers_every_ranks_files_into_one_manifest(tmp_path):
    from paddle_semoe.comm import SimulatedWorld
    from paddle_semoe.comm.topology import CommGroup
    from paddle_semoe.engine.checkpoint import gather_records, write_checkpoint
    from paddle_semoe.io.files import FileRecord, write_atomic, sha256_bytes

    sim = SimulatedWorld(2, timeout_s=30)

    def rank_fn(r: int):
        world = CommGroup("world", (0, 1), r)
        comm = sim.communicator(r)

        def write_files(tmp):
            recs = [ck.save_shard(tmp / ck.shard_name(r), {"param/w": np.full((2,), r, np.float32)}, {"rank": r})]
            if r == 1:  # ranks may write different numbers of files
                (tmp / "experts").mkdir(exist_ok=True)
                write_atomic(tmp / "experts" / "index_00001.json", b"{}")
                recs.append(FileRecord("experts/index_00001.json", sha256_bytes(b"{}"), 2))
            return recs

        path = write_checkpoint(
            tmp_path, 6, comm, world, write_files=write_files, meta={"kind": "test"}, keep=2,
            write_config=lambda p: p.write_text("a: 1\n"),
        )
        with pytest.raises(ValueError, match="longer than 128 bytes"):
            gather_records(comm, CommGroup.solo("x", r), [FileRecord("n" * 129, "00" * 32, 1)])
        return path

    paths = sim.run(rank_fn)
    assert paths[0] == paths[1] == tmp_path / "step_00000006"
    m = ck.read_manifest(paths[0])  # verifies every file
    assert list(m.files) == ["rank_00000.npz", "rank_00001.npz", "experts/index_00001.json", "config.yaml"]
    assert m.world_size == 2 and m.step == 6 and m.meta == {"kind": "test"}
    assert m.shard(1)[0]["param/w"].tolist() == [1.0, 1.0]
    assert ck.resolve_checkpoint("auto", tmp_path) == paths[0]
    assert not (tmp_path / "step_00000006.tmp").exists()
