"""SSD tier: checksummed per-expert files, write-then-rename, recovery, hard-link snapshots."""

import mmap
import os

import numpy as np
import pytest

from paddle_semoe.storage.layout import BLOCK, ExpertStateLayout
from paddle_semoe.storage.ssd import SSDTier, StorageError, state_file_name

LAYOUT = ExpertStateLayout(d_model=8, d_ff=16)


def _payload(seed: int) -> mmap.mmap:
    buf = mmap.mmap(-1, LAYOUT.slot_bytes)
    np.frombuffer(buf, dtype=np.float32)[:] = np.random.default_rng(seed).standard_normal(LAYOUT.slot_bytes // 4)
    return buf


def _read(tier: SSDTier, layer: int, expert: int) -> np.ndarray:
    buf = mmap.mmap(-1, LAYOUT.slot_bytes)
    tier.read(layer, expert, memoryview(buf))
    return np.frombuffer(buf, dtype=np.float32).copy()


def test_layout_sizes_and_views():
    n = 2 * 8 * 16 + 16 + 8
    assert LAYOUT.numel == n and LAYOUT.state_bytes == 12 * n and LAYOUT.slot_bytes % BLOCK == 0
    slot = np.arange(LAYOUT.slot_bytes // 4, dtype=np.float32)
    v = LAYOUT.views(slot)
    assert v["master"]["w1"].shape == (8, 16) and v["v"]["b2"].shape == (8,)
    assert v["m"]["w1"][0, 0] == n and v["v"]["w1"][0, 0] == 2 * n  # sections back to back
    v["m"]["b1"][:] = -1  # views, not copies
    assert (slot[n + 128 : n + 144] == -1).all()


@pytest.mark.parametrize("o_direct", [True, False])
def test_round_trip_and_atomic_replacement(tmp_path, o_direct):
    tier = SSDTier(tmp_path, LAYOUT, o_direct=o_direct)
    a, b = _payload(1), _payload(2)
    info = tier.write(3, 17, memoryview(a), seq=5)
    assert info.name == state_file_name(3, 17) == "l003_e000017.bin" and info.seq == 5
    assert info.bytes == BLOCK + LAYOUT.slot_bytes == os.path.getsize(tmp_path / info.name)
    np.testing.assert_array_equal(_read(tier, 3, 17), np.frombuffer(a, dtype=np.float32))
    inode = os.stat(tmp_path / info.name).st_ino
    tier.write(3, 17, memoryview(b), seq=6)
    assert os.stat(tmp_path / info.name).st_ino != inode  # a new file replaced the old one
    np.testing.assert_array_equal(_read(tier, 3, 17), np.frombuffer(b, dtype=np.float32))
    assert not list(tmp_path.glob("*.tmp"))


def test_corruption_truncation_and_mismatch_are_named(tmp_path):
    tier = SSDTier(tmp_path, LAYOUT)
    tier.write(0, 1, memoryview(_payload(1)), seq=0)
    path = tmp_path / state_file_name(0, 1)
    raw = bytearray(path.read_bytes())
    raw[BLOCK + 100] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(StorageError, match=r"l000_e000001.bin is corrupt: payload CRC-32"):
        _read(tier, 0, 1)
    raw[BLOCK + 100] ^= 0x01
    raw[20] ^= 0xFF  # header field
    path.write_bytes(bytes(raw))
    with pytest.raises(StorageError, match="header checksum mismatch"):
        _read(tier, 0, 1)
    path.write_bytes(bytes(raw[: BLOCK + 2048]))
    with pytest.raises(StorageError, match="truncated or altered"):
        _read(tier, 0, 1)
    with pytest.raises(StorageError, match="expert state file missing"):
        _read(tier, 0, 2)
    tier.write(0, 2, memoryview(_payload(2)), seq=0)
    os.replace(tmp_path / state_file_name(0, 2), tmp_path / state_file_name(0, 3))
    with pytest.raises(StorageError, match="holds layer 0 expert 2, expected layer 0 expert 3"):
        _read(tier, 0, 3)
    other = SSDTier(tmp_path / "x", ExpertStateLayout(8, 32))
    other.root.joinpath(state_file_name(0, 2)).write_bytes((tmp_path / state_file_name(0, 3)).read_bytes()[: other.file_bytes].ljust(other.file_bytes, b"\0"))
    with pytest.raises(StorageError, match="does not match the model"):
        other.verify_file(other.path(0, 2))


def test_a_torn_write_leaves_the_old_state_and_recover_removes_it(tmp_path):
    tier = SSDTier(tmp_path, LAYOUT)
    a = _payload(1)
    tier.write(1, 0, memoryview(a), seq=1)
    # what a crash halfway through the next write-back leaves: a partial .tmp beside the intact file
    tmp = tmp_path / (state_file_name(1, 0) + ".tmp")
    tmp.write_bytes((tmp_path / state_file_name(1, 0)).read_bytes()[: BLOCK + 8192])
    reopened = SSDTier(tmp_path, LAYOUT)
    assert reopened.recover() == 1 and not tmp.exists()
    assert [i.seq for i in reopened.verify_all([(1, 0)])] == [1]
    np.testing.assert_array_equal(_read(reopened, 1, 0), np.frombuffer(a, dtype=np.float32))


def test_snapshot_links_files_and_restore_verifies_against_the_index(tmp_path):
    live = SSDTier(tmp_path / "live", LAYOUT)
    keys = [(0, 0), (0, 1)]
    for i, (l, e) in enumerate(keys):
        live.write(l, e, memoryview(_payload(i)), seq=i)
    infos = live.snapshot(tmp_path / "ckpt", keys)
    assert [i.name for i in infos] == [state_file_name(*k) for k in keys]
    for k in keys:  # hard links: O(1), same inode
        assert os.stat(live.path(*k)).st_ino == os.stat(tmp_path / "ckpt" / state_file_name(*k)).st_ino
    live.write(0, 0, memoryview(_payload(9)), seq=9)  # a later write-back does not touch the snapshot
    expected = {i.name: i.crc32 for i in infos}
    other = SSDTier(tmp_path / "other", LAYOUT)
    other.restore(tmp_path / "ckpt", expected, keys)
    np.testing.assert_array_equal(_read(other, 0, 0), np.frombuffer(_payload(0), dtype=np.float32))
    bad = dict(expected)
    bad[state_file_name(0, 1)] ^= 1
    with pytest.raises(StorageError, match="does not match the checkpoint index"):
        other.restore(tmp_path / "ckpt", bad, keys)
    with pytest.raises(StorageError, match="no expert state for layer 0 expert 5"):
        other.restore(tmp_path / "ckpt", expected, [(0, 5)])


def test_fault_injection_spec_is_validated(tmp_path, monkeypatch):
    monkeypatch.setenv("SEMOE_STORAGE_FAULT", "explode")
    with pytest.raises(ValueError, match="kill_in_writeback:N"):
        SSDTier(tmp_path, LAYOUT)
