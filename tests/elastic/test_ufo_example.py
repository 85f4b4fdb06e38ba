"""The UFO example's data tasks, config and launcher helpers (no processes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from paddle_semoe.config import ConfigError, load_config
from paddle_semoe.elastic.launch import _nproc, launch_command, parse_args
from ufo_example.config import UFOJobConfig
from ufo_example.data import DataConfig, DigitsTasks, load_digit_images

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "ufo_example" / "configs"
KINDS = ["digit", "parity", "ge5", "rotation"]


@pytest.fixture(scope="module")
def synth() -> DigitsTasks:
    return DigitsTasks(DataConfig(source="synthetic"), KINDS, seed=5)


def test_labels_of_the_four_tasks(synth):
    idx = synth.train_idx[:40]
    digits = synth.labels[idx]
    assert (synth.samples(0, idx)[1] == digits).all()
    assert (synth.samples(1, idx)[1] == digits % 2).all()
    assert (synth.samples(2, idx)[1] == (digits >= 5)).all()
    x, k = synth.samples(3, idx)
    for i in range(5):
        np.testing.assert_array_equal(x[i, 0], np.rot90(synth.images[idx[i]], int(k[i])))
    assert set(np.unique(k)) == {0, 1, 2, 3}
    assert x.dtype == np.float32 and x.shape == (40, 1, 8, 8)


def test_split_is_deterministic_and_disjoint(synth):
    again = DigitsTasks(DataConfig(source="synthetic"), KINDS, seed=99)
    np.testing.assert_array_equal(synth.val_idx, again.val_idx)
    assert not set(synth.val_idx) & set(synth.train_idx)
    assert len(synth.val_idx) == 120 and len(synth.train_idx) == 480


def test_stream_is_a_permutation_per_pass_and_shards_tile_the_batch(synth):
    n = synth.n_train
    first = synth.stream_positions(1, 0, n)
    assert sorted(first.tolist()) == sorted(synth.train_idx.tolist())
    second = synth.stream_positions(1, n, n)
    assert sorted(second.tolist()) == sorted(first.tolist()) and (second != first).any()
    whole_x, whole_y = synth.train_batch(0, 37, 24, 0, 24)
    parts = [synth.train_batch(0, 37, 24, s, c) for s, c in ((0, 10), (10, 7), (17, 7))]
    np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), whole_x)
    np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), whole_y)


def test_upsampling_keeps_the_image():
    t = DigitsTasks(DataConfig(source="synthetic", image_size=16), KINDS, seed=5)
    x, _ = t.samples(0, t.train_idx[:2])
    assert x.shape == (2, 1, 16, 16)
    np.testing.assert_array_equal(x[:, 0, ::2, ::2], t.images[t.train_idx[:2]])


def test_real_digits_are_read_from_the_installed_package():
    images, labels = load_digit_images("digits")
    assert images.shape == (1797, 8, 8) and labels.shape == (1797,)
    assert 0.0 <= images.min() and images.max() == 1.0
    assert np.bincount(labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    np.testing.assert_allclose(images.reshape(1797, 64), X / 16.0, rtol=1e-6)
    np.testing.assert_array_equal(labels, y)


@pytest.mark.parametrize("name", ["ufo_tiny_cpu.yaml", "ufo_bench_cpu.yaml", "ufo_vit_gpu.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(UFOJobConfig, CONFIGS / name)
    assert [t.kind for t in cfg.tasks] == KINDS
    bs = [t.batch_size for t in cfg.tasks]
    assert bs[0] == 2 * bs[1] == 4 * bs[2] == 4 * bs[3]


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="elastic.plann"):
        load_config(UFOJobConfig, CONFIGS / "ufo_tiny_cpu.yaml", ["elastic.plann=naive"])
    with pytest.raises(ConfigError, match="plan must be one of"):
        load_config(UFOJobConfig, CONFIGS / "ufo_tiny_cpu.yaml", ["elastic.plan=greedy"])
    with pytest.raises(ConfigError, match="needs tasks\\[\\*\\].per_sample_cost"):
        load_config(UFOJobConfig, CONFIGS / "ufo_tiny_cpu.yaml", ["elastic.cost_source=config"])
    with pytest.raises(ConfigError, match="model.image_size=8 must equal data.image_size=16"):
        load_config(UFOJobConfig, CONFIGS / "ufo_tiny_cpu.yaml", ["data.image_size=16"])


def test_restart_launcher_arguments():
    args, rest = parse_args(["--max_restart", "2", "--nproc_per_node", "4", "--nproc_schedule", "4,2", "t.py", "-c", "x"])
    assert rest == ["t.py", "-c", "x"] and args.max_restart == 2
    assert [_nproc(args, a) for a in range(4)] == [4, 2, 2, 2]
    cmd = launch_command(2, "logs", rest)
    assert cmd[1:] == ["-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", "logs",
                       "--max_restart", "0", "t.py", "-c", "x"]
