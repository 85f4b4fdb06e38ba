"""Checkpoints re-planned and resharded: save under one plan (4 simulated ranks), load under
another (2 and 1), checksums, and refusals that name the problem."""

from __future__ import annotations

import numpy as np
import paddle
import pytest

from paddle_semoe.comm import SimulatedWorld
from paddle_semoe.comm.topology import CommGroup
from paddle_semoe.elastic.groups import TaskGroups
from paddle_semoe.elastic.planner import TaskLoad, plan_load_aware, plan_naive
from paddle_semoe.elastic.state import checkpoint_digest, entity_digest, live_digest, restore_elastic, save_elastic
from paddle_semoe.elastic.sync import ElasticGradSync
from paddle_semoe.io import checkpoint as ckpt
from paddle_semoe.io.checkpoint import CheckpointError

from tests.elastic import _ufo_problem as up


def _world(sim: SimulatedWorld, rank: int) -> CommGroup:
    return CommGroup("world", tuple(range(sim.world_size)), rank)


def _opt(model) -> paddle.optimizer.AdamW:
    return paddle.optimizer.AdamW(learning_rate=1e-2, parameters=model.parameters(), weight_decay=0.01)


def _train_one_step_and_save(root, plan, step=3):
    """Every rank: one synced AdamW step under ``plan``, then a checkpoint."""
    sim = SimulatedWorld(plan.world_size, timeout_s=60)

    def rank_fn(r):
        model = up.build(plan.rank_tasks(r))
        named = list(model.named_parameters())
        opt = _opt(model)
        sync = ElasticGradSync(named, plan, TaskGroups.from_handles(plan, r), sim.communicator(r))
        loss = up.local_objective(model, plan, r)
        if loss is not None:
            loss.backward()
        sync.reduce()
        opt.step()
        opt.clear_grad()
        path, sha = save_elastic(
            root, step, plan, named, opt, {"step": step, "seed": up.SEED}, sim.communicator(r), _world(sim, r), keep=2
        )
        return path, sha, {n: p.numpy() for n, p in named}

    return sim.run(rank_fn)


def _restore(path, plan):
    manifest = ckpt.read_manifest(path)
    sim = SimulatedWorld(plan.world_size, timeout_s=60)

    def rank_fn(r):
        model = up.build(plan.rank_tasks(r))
        named = list(model.named_parameters())
        opt = _opt(model)
        progress = restore_elastic(manifest, plan, named, opt)
        sha, _ = live_digest(named, plan, sim.communicator(r), _world(sim, r))
        # one more step proves the optimizer state came along (compared across plans below)
        return progress, sha, {n: p.numpy() for n, p in named}, opt

    return manifest, sim.run(rank_fn)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    plan4 = plan_load_aware(up.LOADS, 4)
    results = _train_one_step_and_save(root, plan4)
    return root, plan4, results


def test_checkpoint_has_one_copy_of_every_entity_and_its_checksums(saved):
    root, plan4, results = saved
    path = results[0][0]
    m = ckpt.read_manifest(path)
    assert m.world_size == 4 and m.step == 3
    assert m.meta["owners"] == {"shared": 0, "task:digit": 0, "task:parity": 2, "task:ge5": 3, "task:rotation": 3}
    assert len({sha for _, sha, _ in results}) == 1 and results[0][1] == m.meta["param_sha256"]
    assert checkpoint_digest(m) == (m.meta["param_sha256"], m.meta["entity_sha256"])
    t1, meta1 = m.shard(1)  # rank 1 holds a replica of digit, owned by rank 0: saves nothing
    assert meta1["entities"] == [] and not [k for k in t1 if k.startswith("param/")]
    t0, _ = m.shard(0)
    assert "opt/blocks.0.moe.experts.digit.w1/moment1_0" in t0


@pytest.mark.parametrize("world, strategy", [(2, "load_aware"), (1, "naive"), (4, "naive")])
def test_restore_onto_another_plan_gives_the_same_model(saved, world, strategy):
    root, plan4, results = saved
    gathered = {}
    for _, _, params in results:
        for n, a in params.items():
            if n in gathered:
                np.testing.assert_array_equal(gathered[n], a, err_msg=f"replicas of {n} differ")
            gathered[n] = a
    loads = plan4.tasks
    new = plan_load_aware(loads, world) if strategy == "load_aware" else plan_naive(loads, world)
    manifest, out = _restore(results[0][0], new)
    for r, (progress, sha, params, opt) in enumerate(out):
        assert progress == {"step": 3, "seed": up.SEED}
        assert sha == manifest.meta["param_sha256"]
        for n, a in params.items():
            np.testing.assert_array_equal(a, gathered[n], err_msg=f"rank {r} {n}")
        state = opt.state_dict()
        assert any(k.endswith("moment1_0") for k in state), "AdamW moments restored"


def test_restore_refuses_other_tasks_and_other_shapes(saved, tmp_path):
    root, plan4, results = saved
    m = ckpt.read_manifest(results[0][0])
    other = [TaskLoad(t.name + "x", t.batch_size, 1.0) for t in plan4.tasks]
    p1 = plan_naive(other, 1)
    with pytest.raises(CheckpointError, match="was trained on tasks"):
        restore_elastic(m, p1, [], None)
    # a model with another width: the shape error names the parameter
    from paddle_semoe.models.ufo import UFOConfig, UFOModel

    wide = UFOModel(UFOConfig(image_size=8, patch_size=4, d_model=16, n_layers=2, n_heads=2, d_ff=32, moe_every=1), up.HEADS, [0, 1, 2, 3])
    with pytest.raises(CheckpointError, match=r"'blocks.0.moe.shared.w1' has shape \[16, 24\], the model expects \[16, 32\]"):
        restore_elastic(m, plan_naive(plan4.tasks, 1), list(wide.named_parameters()), _opt(wide))
    deep = UFOModel(UFOConfig(image_size=8, patch_size=4, d_model=16, n_layers=3, n_heads=2, d_ff=24, moe_every=1), up.HEADS, [0])
    with pytest.raises(CheckpointError, match="parameters differ from the model"):
        restore_elastic(m, plan_naive(plan4.tasks, 1), list(deep.named_parameters()), _opt(deep))


def test_entity_digest_depends_on_names_values_and_dtypes():
    a = {"x": np.zeros(3, np.float32)}
    assert entity_digest(a) == entity_digest({"x": np.zeros(3, np.float32)})
    assert entity_digest(a) != entity_digest({"y": np.zeros(3, np.float32)})
    assert entity_digest(a) != entity_digest({"x": np.zeros(3, np.float64)})
    assert entity_digest(a) != entity_digest({"x": np.array([0, 0, 1e-30], np.float32)})
