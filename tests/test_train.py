"""`distrain train` end to end in one process: outputs, schedule, W&B read-back, resume, eval."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import checked, distrain, read_jsonl
from safetensors.torch import load_file
from wandb_offline import read_offline_runs

from distrain.config import from_dict, load_config
from distrain.optim.schedule import lr_at
from distrain.plan import make_plan


def recipe(tmp_path, digits, **sections) -> str:
    """A small digits recipe (16 px, ResNet-20, accumulation 2) written to tmp_path/recipe.yaml."""
    doc = {
        "name": "t",
        "run_dir": str(tmp_path / "run"),
        "data": {"train": str(digits / "train"), "eval": str(digits / "test"), "train_crop": 16,
                 "eval_resize": 16, "eval_crop": 16, "scale": [0.6, 1.0], "hflip": False, "workers": 1,
                 "mean": [0.5] * 3, "std": [0.5] * 3, "shuffle_block": 256},
        "model": {"name": "cifar_resnet20"},
        "batch": {"per_device": 16, "accumulation": 2},
        "optim": {"lr": 0.1, "base_batch": 32, "nesterov": True, "weight_decay": 5e-4},
        "schedule": {"epochs": 2, "warmup_epochs": 0.5, "warmup_start_lr": 0.01, "decay": "cosine"},
        "train": {"log_every": 1, "label_smoothing": 0.1},
        "eval": {"every_epochs": 1, "batch_size": 50},
        "checkpoint": {"every_epochs": 1, "keep_last": 1},
    }
    for section, values in sections.items():
        doc[section] = {**doc.get(section, {}), **values} if isinstance(values, dict) else values
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


# Stochastic depth and dropout on: they draw from the per-rank, per-micro-batch generator, so the
# resumed run below must draw the same masks as this uninterrupted one.
STOCHASTIC = {"name": "cifar_resnet20", "drop_path_rate": 0.1, "dropout": 0.1}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, digits):
    tmp = tmp_path_factory.mktemp("full")
    cfg_path = recipe(tmp, digits, model=STOCHASTIC)
    proc = checked(distrain(["train", cfg_path], cwd=tmp))
    return tmp, cfg_path, proc


def test_outputs_and_summary_line(full_run):
    tmp, cfg_path, proc = full_run
    run = tmp / "run"
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("distrain: done:") and str(run) in last and "eval top-1" in last
    summary = json.loads((run / "summary.json").read_text())
    assert f"{summary['eval/top1']:.2f}%" in last and summary["eval/samples"] == 360
    assert summary["deterministic_algorithms"] is False  # the default leaves fast kernels on
    assert from_dict(yaml.safe_load((run / "config.yaml").read_text())) == load_config(cfg_path)
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["update-00000088"]
    events = read_jsonl(run / "metrics.jsonl")
    train = [e for e in events if "train/loss" in e]
    assert all({"step", "epoch", "train/lr", "train/images_per_s", "train/grad_norm"} <= e.keys() for e in train)
    evals = [e for e in events if "eval/top1" in e]
    assert [e["epoch"] for e in evals] == [1, 2] and evals[-1]["eval/top1"] == summary["eval/top1"]
    assert train[-1]["train/loss"] < train[0]["train/loss"]


def test_lr_follows_the_plan_once_per_update(full_run):
    # 1 process x 16 x accumulation 2 = 32 per update; 1437 // 32 = 44 updates per epoch, 88 in all.
    tmp, cfg_path, _ = full_run
    cfg = load_config(cfg_path)
    plan = make_plan(cfg, 1, 1437)
    assert plan.total_updates == 88 and plan.warmup_updates == 22
    train = [e for e in read_jsonl(tmp / "run" / "metrics.jsonl") if "train/lr" in e]
    assert [e["step"] for e in train] == list(range(1, 89))
    for e in train:
        assert e["train/lr"] == pytest.approx(lr_at(e["step"] - 1, plan, cfg.schedule), rel=1e-12)
    assert train[0]["train/lr"] == pytest.approx(0.01) and max(e["train/lr"] for e in train) == pytest.approx(0.1, rel=1e-3)


def test_wandb_offline_matches_metrics(full_run):
    tmp, _, _ = full_run
    runs = read_offline_runs(tmp / "run")
    assert len(runs) == 1
    run = runs[0]
    assert run["config"]["model"]["name"] == "cifar_resnet20" and run["config"]["batch"]["accumulation"] == 2
    logged = {}
    for row in run["history"]:
        logged.setdefault(row["_step"], {}).update({k: v for k, v in row.items() if not k.startswith("_")})
    # The final eval's confusion matrix goes to W&B as an image (metrics.jsonl has no place for it).
    image = {k: logged[max(logged)].pop(k) for k in list(logged[max(logged)]) if k.startswith("eval/confusion.")}
    assert image["eval/confusion._type"] == "image-file" and image["eval/confusion.path"].endswith(".png")
    expected = {}
    for e in read_jsonl(tmp / "run" / "metrics.jsonl"):
        expected.setdefault(e["step"], {}).update({k: v for k, v in e.items() if k not in ("step", "epoch")})
    assert logged == expected


def test_eval_command_reproduces_final_top1(full_run):
    tmp, _, _ = full_run
    summary = json.loads((tmp / "run" / "summary.json").read_text())
    out = checked(distrain(["eval", str(tmp / "run"), "--json"], cwd=tmp)).stdout.strip().splitlines()[-1]
    metrics = json.loads(out)
    assert metrics["eval/top1"] == summary["eval/top1"] and metrics["eval/samples"] == 360


def test_resume_continues_exactly(full_run, tmp_path, digits):
    """Stop mid-epoch at update 30, resume with --resume auto: the same per-update losses as the full run
    (drop path and dropout included)."""
    full_tmp, _, _ = full_run
    cfg_path = recipe(tmp_path, digits, model=STOCHASTIC)
    checked(distrain(["train", cfg_path, "train.max_updates=30"], cwd=tmp_path))
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["update-00000030"]
    proc = checked(distrain(["train", cfg_path, "--resume", "auto"], cwd=tmp_path))
    assert "resuming from" in proc.stderr
    full = {e["step"]: e["train/loss"] for e in read_jsonl(full_tmp / "run" / "metrics.jsonl") if "train/loss" in e}
    resumed = {e["step"]: e["train/loss"] for e in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "train/loss" in e}
    assert sorted(resumed) == list(range(1, 89))
    assert [f"{resumed[s]:.6f}" for s in range(31, 89)] == [f"{full[s]:.6f}" for s in range(31, 89)]
    a = load_file(full_tmp / "run" / "checkpoints" / "update-00000088" / "model.safetensors")
    b = load_file(tmp_path / "run" / "checkpoints" / "update-00000088" / "model.safetensors")
    assert all((a[k] == b[k]).all() for k in a)


def test_user_errors_are_one_line(tmp_path, digits):
    cfg_path = recipe(tmp_path, digits)
    for args, needle in [
        (["train", cfg_path, "optim.lrr=0.1"], "did you mean optim.lr"),
        (["train", cfg_path, "data.train=" + str(tmp_path / "nowhere")], "nowhere"),
        (["train", cfg_path, "model.name=resnet51"], "resnet50"),
        (["train", str(tmp_path / "missing.yaml")], "missing.yaml"),
        (["eval", str(tmp_path / "no-run")], "no-run"),
    ]:
        proc = distrain(args, cwd=tmp_path)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("distrain: error:"), proc.stderr
        assert needle in lines[0]
