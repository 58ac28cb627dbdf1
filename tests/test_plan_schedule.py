"""Batch maths (``make_plan``, ``scale_lr``) and the LR schedule (``lr_at``), incl. Goyal et al.'s numbers."""

from __future__ import annotations

import json
import math

import pytest

from distrain.cli import main
from distrain.config import from_dict
from distrain.errors import DistrainError
from distrain.optim.schedule import lr_at
from distrain.plan import BatchPlan, make_plan, resolve_batch, scale_lr

IMAGENET_TRAIN = 1_281_167

GOYAL = {
    "model": {"name": "resnet50"},
    "batch": {"per_device": 32, "accumulation": 1},
    "optim": {"name": "sgd", "lr": 0.1, "base_batch": 256, "scaling": "linear", "momentum": 0.9},
    "schedule": {"epochs": 90, "warmup_epochs": 5, "decay": "multistep", "milestones": [30, 60, 80], "gamma": 0.1},
}


def cfg_with(**sections):
    data = {k: dict(v) for k, v in GOYAL.items()}
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return from_dict(data)


@pytest.fixture
def goyal():
    cfg = from_dict(GOYAL)
    return cfg, make_plan(cfg, world_size=32 * 8, train_samples=IMAGENET_TRAIN)


# --- batch maths ----------------------------------------------------------------------------------


@pytest.mark.parametrize("per_device, accumulation, world", [(32, 1, 1), (16, 4, 2), (8, 3, 5), (64, 2, 8)])
def test_global_batch_and_updates(per_device, accumulation, world):
    cfg = cfg_with(batch={"per_device": per_device, "accumulation": accumulation}, schedule={"epochs": 7})
    samples = 10_007
    plan = make_plan(cfg, world, samples)
    g = per_device * accumulation * world
    assert plan.global_batch == g
    assert plan.world_size == world and plan.per_device == per_device and plan.accumulation == accumulation
    assert plan.updates_per_epoch == samples // g
    assert plan.micro_batches_per_epoch == (samples // g) * accumulation
    assert plan.samples_per_epoch == (samples // g) * g <= samples
    assert plan.total_updates == (samples // g) * 7
    assert plan.epochs == 7 and plan.train_samples == samples


def test_warmup_and_milestones_in_updates():
    cfg = cfg_with(batch={"per_device": 10}, schedule={"epochs": 10, "warmup_epochs": 1.5, "milestones": [2.5, 5, 9]})
    plan = make_plan(cfg, 1, 1_005)  # 100 updates per epoch
    assert plan.updates_per_epoch == 100
    assert plan.warmup_updates == 150
    assert plan.milestone_updates == (250, 500, 900)
    assert plan.total_updates == 1000
    assert isinstance(plan.warmup_updates, int) and all(isinstance(m, int) for m in plan.milestone_updates)


def test_lr_scaling_rules():
    assert scale_lr(0.1, 8192, 256, "linear") == pytest.approx(3.2)
    assert scale_lr(0.1, 8192, 256, "sqrt") == pytest.approx(0.1 * math.sqrt(32))
    assert scale_lr(0.1, 8192, 256, "none") == 0.1
    assert scale_lr(0.1, 64, 256, "linear") == pytest.approx(0.025)
    assert scale_lr(0.1, 64, 256, "sqrt") == pytest.approx(0.05)
    assert scale_lr(0.3, 256, 256, "linear") == pytest.approx(0.3)
    for rule, peak in (("linear", 0.4), ("sqrt", 0.2), ("none", 0.1)):
        plan = make_plan(cfg_with(optim={"scaling": rule}), 32, 100_000)  # global 1024 = 4 x 256
        assert plan.peak_lr == pytest.approx(peak)
        assert plan.scaling == rule and plan.base_lr == 0.1 and plan.base_batch == 256


def test_warmup_start_lr_defaults_to_unscaled_lr():
    assert make_plan(cfg_with(), 8, 100_000).warmup_start_lr == 0.1
    plan = make_plan(cfg_with(schedule={"warmup_start_lr": 0.01}), 8, 100_000)
    assert plan.warmup_start_lr == 0.01


def test_global_batch_larger_than_dataset_raises():
    cfg = cfg_with(batch={"per_device": 32, "accumulation": 2})
    with pytest.raises(DistrainError) as e:
        make_plan(cfg, 16, 1000)  # global batch 1024 > 1000 samples
    msg = str(e.value)
    assert "1024" in msg and "1000" in msg and "batch.per_device" in msg
    assert make_plan(cfg, 16, 1024).updates_per_epoch == 1  # exactly one batch is fine


def test_plan_is_frozen_and_as_dict(goyal):
    _, plan = goyal
    d = plan.as_dict()
    assert d["global_batch"] == 8192 and d["milestone_updates"] == (4680, 9360, 12480)
    assert set(d) == {f for f in BatchPlan.__dataclass_fields__}
    with pytest.raises(AttributeError):
        plan.global_batch = 1  # type: ignore[misc]


# --- Goyal et al. 2017: ResNet-50, 8192 images per update on 256 GPUs --------------------------------


def test_goyal_plan_numbers(goyal):
    _, plan = goyal
    assert plan.world_size == 256
    assert plan.global_batch == 8192
    assert plan.updates_per_epoch == 156  # 1,281,167 // 8192
    assert plan.samples_per_epoch == 156 * 8192
    assert plan.peak_lr == pytest.approx(3.2)
    assert plan.warmup_updates == 780
    assert plan.warmup_start_lr == pytest.approx(0.1)
    assert plan.milestone_updates == (4680, 9360, 12480)
    assert plan.total_updates == 14040


def test_goyal_warmup_lr(goyal):
    cfg, plan = goyal
    assert lr_at(0, plan, cfg.schedule) == pytest.approx(0.1)
    assert lr_at(390, plan, cfg.schedule) == pytest.approx((0.1 + 3.2) / 2)  # midway: linear
    assert lr_at(195, plan, cfg.schedule) == pytest.approx(0.1 + 3.1 * 0.25)
    assert lr_at(779, plan, cfg.schedule) == pytest.approx(0.1 + 3.1 * 779 / 780)
    assert lr_at(780, plan, cfg.schedule) == pytest.approx(3.2)
    values = [lr_at(u, plan, cfg.schedule) for u in range(781)]
    steps = [b - a for a, b in zip(values, values[1:])]
    assert all(s == pytest.approx(3.1 / 780) for s in steps)


def test_goyal_multistep_milestones(goyal):
    cfg, plan = goyal
    s = cfg.schedule
    assert lr_at(4679, plan, s) == pytest.approx(3.2)
    assert lr_at(4680, plan, s) == pytest.approx(0.32)
    assert lr_at(9359, plan, s) == pytest.approx(0.32)
    assert lr_at(9360, plan, s) == pytest.approx(0.032)
    assert lr_at(12479, plan, s) == pytest.approx(0.032)
    assert lr_at(12480, plan, s) == pytest.approx(0.0032)
    assert lr_at(14039, plan, s) == pytest.approx(0.0032)  # the last update


# --- cosine and constant --------------------------------------------------------------------------


@pytest.mark.parametrize("final_factor", [0.0, 0.01])
def test_cosine(final_factor):
    cfg = cfg_with(schedule={"decay": "cosine", "final_lr_factor": final_factor, "warmup_epochs": 5})
    plan = make_plan(cfg, 256, IMAGENET_TRAIN)
    s = cfg.schedule
    peak, final = 3.2, 3.2 * final_factor
    w, total = plan.warmup_updates, plan.total_updates
    assert lr_at(0, plan, s) == pytest.approx(0.1)
    assert lr_at(w, plan, s) == pytest.approx(peak)
    assert lr_at(w + (total - w) // 2, plan, s) == pytest.approx((peak + final) / 2)
    assert lr_at(total, plan, s) == pytest.approx(final, abs=1e-12)
    assert lr_at(total + 100, plan, s) == pytest.approx(final, abs=1e-12)  # clamped past the end
    decay = [lr_at(u, plan, s) for u in range(w, total + 1)]
    assert all(b <= a + 1e-12 for a, b in zip(decay, decay[1:]))  # monotone non-increasing
    assert min(decay) >= final - 1e-12


def test_cosine_without_warmup_starts_at_peak():
    cfg = cfg_with(schedule={"decay": "cosine", "warmup_epochs": 0})
    plan = make_plan(cfg, 8, 25_600)  # global 256, 100 updates/epoch
    assert plan.warmup_updates == 0
    assert lr_at(0, plan, cfg.schedule) == pytest.approx(0.1)
    assert lr_at(plan.total_updates // 2, plan, cfg.schedule) == pytest.approx(0.05)


def test_constant():
    cfg = cfg_with(schedule={"decay": "constant", "warmup_epochs": 1})
    plan = make_plan(cfg, 16, 51_200)  # global 512 -> peak 0.2, 100 updates/epoch
    s = cfg.schedule
    assert lr_at(0, plan, s) == pytest.approx(0.1)
    assert lr_at(50, plan, s) == pytest.approx(0.15)
    for u in (100, 101, 5000, plan.total_updates - 1):
        assert lr_at(u, plan, s) == pytest.approx(0.2)


def test_warmup_start_lr_override():
    cfg = cfg_with(schedule={"warmup_start_lr": 0.0, "warmup_epochs": 1})
    plan = make_plan(cfg, 8, 25_600)  # 100 updates/epoch, peak 0.1
    assert lr_at(0, plan, cfg.schedule) == 0.0
    assert lr_at(25, plan, cfg.schedule) == pytest.approx(0.025)


# --- `distrain plan` ------------------------------------------------------------------------------


def _goyal_recipe(tmp_path):
    p = tmp_path / "goyal.yaml"
    p.write_text(
        """
name: goyal
data:
  train_samples: 1281167
model:
  name: resnet50
batch:
  per_device: 32
  accumulation: 1
optim:
  lr: 0.1
  base_batch: 256
  scaling: linear
schedule:
  epochs: 90
  warmup_epochs: 5
  decay: multistep
  milestones: [30, 60, 80]
"""
    )
    return p


def test_cli_plan_json(tmp_path, capsys):
    rc = main(["plan", str(_goyal_recipe(tmp_path)), "--nodes", "32", "--gpus-per-node", "8", "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    plan = json.loads(out)
    assert plan["world_size"] == 256
    assert plan["global_batch"] == 8192
    assert plan["train_samples"] == IMAGENET_TRAIN
    assert plan["updates_per_epoch"] == 156
    assert plan["peak_lr"] == pytest.approx(3.2)
    assert plan["warmup_updates"] == 780
    assert plan["warmup_start_lr"] == pytest.approx(0.1)
    assert plan["milestone_updates"] == [4680, 9360, 12480]
    assert plan["total_updates"] == 14040


def test_cli_plan_json_with_overrides(tmp_path, capsys):
    recipe = _goyal_recipe(tmp_path)
    rc = main(["plan", str(recipe), "batch.accumulation=2", "--nodes", "16", "--gpus-per-node", "8", "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    plan = json.loads(out)
    assert (plan["world_size"], plan["global_batch"], plan["updates_per_epoch"]) == (128, 8192, 156)
    assert plan["micro_batches_per_epoch"] == 312


def test_cli_plan_table(tmp_path, capsys):
    rc = main(["plan", str(_goyal_recipe(tmp_path)), "--nodes", "32", "--gpus-per-node", "8"])
    out, _ = capsys.readouterr()
    assert rc == 0
    rows = {line.split("  ")[0].strip(): line for line in out.splitlines()}
    assert "32 node(s) x 8 = 256" in rows["processes"]
    assert rows["global batch"].split()[-1] == "8192"
    assert rows["updates per epoch"].split()[-1] == "156"
    assert rows["total updates"].split()[-1] == "14040"
    assert "3.2 (linear scaling)" in rows["peak LR"]
    assert "780 from LR 0.1" in rows["warmup updates"]
    assert "4680, 9360, 12480 (x0.1)" in rows["milestone updates"]


def test_cli_plan_batch_too_large_is_one_line(tmp_path, capsys):
    rc = main(["plan", str(_goyal_recipe(tmp_path)), "data.train_samples=1000", "--nodes", "32", "--gpus-per-node", "8"])
    _, err = capsys.readouterr()
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("distrain: error:") and "8192" in err


def test_cli_plan_without_dataset_size_is_one_line(tmp_path, capsys):
    p = tmp_path / "nodata.yaml"
    p.write_text("name: x\n")
    rc = main(["plan", str(p)])
    _, err = capsys.readouterr()
    assert rc == 2
    assert len(err.splitlines()) == 1 and "data.train_samples" in err


def test_poly_decay_and_warmup_in_updates():
    cfg = cfg_with(schedule={"epochs": 10, "warmup_updates": 10, "decay": "poly", "power": 2.0,
                             "final_lr_factor": 0.0, "warmup_start_lr": 0.0},
                   optim={"lr": 0.1, "base_batch": 32}, batch={"per_device": 32})
    plan = make_plan(cfg, 1, 320)  # 10 updates per epoch, 100 in all
    assert plan.warmup_updates == 10 and plan.total_updates == 100
    assert lr_at(5, plan, cfg.schedule) == pytest.approx(0.05)
    assert lr_at(10, plan, cfg.schedule) == pytest.approx(0.1)
    assert lr_at(55, plan, cfg.schedule) == pytest.approx(0.1 * 0.5**2)
    assert lr_at(100, plan, cfg.schedule) == pytest.approx(0.0)


def test_goyal_recipe_file_plans_the_paper_numbers(capsys):
    from conftest import REPO

    recipe_path = REPO / "configs" / "imagenet" / "resnet50_goyal_8k.yaml"
    assert main(["plan", str(recipe_path), "--nodes", "32", "--gpus-per-node", "8", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert (plan["global_batch"], plan["updates_per_epoch"], plan["total_updates"]) == (8192, 156, 14040)
    assert plan["peak_lr"] == pytest.approx(3.2) and plan["warmup_start_lr"] == pytest.approx(0.1)
    assert plan["warmup_updates"] == 780 and plan["milestone_updates"] == [4680, 9360, 12480]


def test_torchvision_sota_recipe_file_plans_its_numbers(capsys):
    from conftest import REPO

    recipe_path = REPO / "configs" / "imagenet" / "resnet50_torchvision_sota.yaml"
    assert main(["plan", str(recipe_path), "--nodes", "1", "--gpus-per-node", "8", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert (plan["global_batch"], plan["updates_per_epoch"], plan["total_updates"]) == (1024, 1251, 750600)
    assert plan["peak_lr"] == pytest.approx(0.5) and plan["warmup_start_lr"] == pytest.approx(0.005)
    assert plan["warmup_updates"] == 6255 and plan["repeats"] == 4 and plan["unique_samples_per_epoch"] == 320256


# --- a target global batch on any cluster shape ------------------------------------------------------


@pytest.mark.parametrize("target, max_per_device, world, ghost, expected", [
    (8192, 32, 256, 1, (32, 1)),   # Goyal's 32 nodes x 8 GPUs
    (8192, 32, 32, 1, (32, 8)),    # 4 nodes: accumulate 8 micro-batches
    (8192, 32, 512, 1, (16, 1)),   # 64 nodes: smaller per-GPU batches
    (1024, 48, 8, 1, (32, 4)),     # 128 per rank does not fit 48: 3 does not divide 128, 4 does
    (1024, 48, 8, 16, (32, 4)),
    (1000, 64, 4, 1, (50, 5)),
])
def test_resolve_batch(target, max_per_device, world, ghost, expected):
    per_device, accumulation = resolve_batch(target, max_per_device, world, ghost)
    assert (per_device, accumulation) == expected
    assert per_device * accumulation * world == target and per_device <= max_per_device
    assert per_device % ghost == 0


@pytest.mark.parametrize("target, max_per_device, world, ghost", [(1000, 64, 3, 1), (96, 32, 2, 32)])
def test_resolve_batch_impossible_names_the_key(target, max_per_device, world, ghost):
    with pytest.raises(DistrainError, match="batch.global_batch"):
        resolve_batch(target, max_per_device, world, ghost)


@pytest.mark.parametrize("nodes, expected", [(32, (32, 1)), (4, (32, 8)), (64, (16, 1))])
def test_goyal_recipe_keeps_8k_on_any_shape(capsys, nodes, expected):
    from conftest import REPO

    recipe_path = REPO / "configs" / "imagenet" / "resnet50_goyal_8k.yaml"
    assert main(["plan", str(recipe_path), "--nodes", str(nodes), "--gpus-per-node", "8", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert (plan["per_device"], plan["accumulation"]) == expected
    assert (plan["global_batch"], plan["total_updates"], plan["milestone_updates"]) == (8192, 14040, [4680, 9360, 12480])


def test_fixres_recipe_file_plans_its_numbers(capsys):
    from conftest import REPO

    recipe_path = REPO / "configs" / "imagenet" / "resnet50_fixres.yaml"
    assert main(["plan", str(recipe_path), "--nodes", "1", "--gpus-per-node", "8"]) == 0
    out = capsys.readouterr().out
    assert "450360" in out and "150120, 300240" in out
    assert "280224 updates (56 epochs) at 438/384 px, peak LR 0.004" in out


def test_schedules_follow_the_loop_functions():
    from distrain.track.schedule_plot import schedules
    from distrain.tricks.ema import ema_decay
    from distrain.tricks.progressive import train_size

    cfg = cfg_with(schedule={"epochs": 10, "warmup_epochs": 2, "decay": "cosine"}, batch={"per_device": 10},
                   progressive={"start_size": 128, "start_epoch": 2, "end_epoch": 6},
                   ema={"decay": 0.99, "every": 4}, fixres={"epochs": 2, "lr": 0.01})
    plan = make_plan(cfg, 2, 1000)  # 50 updates per epoch
    s = schedules(cfg, plan)
    assert s.phase_starts == [0, 500] and s.update == list(range(600))
    assert s.lr[:500] == [lr_at(u, plan, cfg.schedule) for u in range(500)]
    assert s.resolution[:500] == [train_size(cfg, u // 50) for u in range(500)]
    assert s.resolution[500:] == [224] * 100 and s.lr[500] == pytest.approx(0.01 * 20 / 256)
    assert s.ema_decay[9] == pytest.approx(ema_decay(0.99, 4, 2, True) ** 0.25)
    assert all(math.isnan(d) for d in s.ema_decay[500:])


def test_cli_plan_png(tmp_path, capsys):
    from conftest import REPO
    from PIL import Image

    recipe_path = REPO / "configs" / "cifar10" / "short_full_recipe.yaml"
    png = tmp_path / "plan.png"
    assert main(["plan", str(recipe_path), "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "24 px from epoch 0, 28 px from epoch 2" in out and "FixRes phase" in out and str(png) in out
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 400 and im.size[1] > 400
