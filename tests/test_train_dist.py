"""`distrain train` on 2 real gloo ranks (torchrun): replicas, exactly-once eval, W&B, accumulation."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import checked, distrain, image_bytes, read_jsonl
from safetensors.torch import load_file
from test_train import recipe
from wandb_offline import read_offline_runs

from distrain.config import ModelConfig
from distrain.models import create_model

pytestmark = [pytest.mark.dist, pytest.mark.slow]


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory, digits):
    tmp = tmp_path_factory.mktemp("dist")
    cfg_path = recipe(tmp, digits, schedule={"epochs": 1}, train={"log_every": 5},
                      distributed={"timeout_s": 120})
    proc = checked(distrain(["train", cfg_path], cwd=tmp, nproc=2))
    return tmp, proc


def test_two_ranks_train_identical_replicas(two_rank_run):
    tmp, proc = two_rank_run
    summary = json.loads((tmp / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2
    # 2 ranks x 16 x accumulation 2 = 64 per update; 1437 // 64 = 22 updates in the epoch.
    assert summary["updates"] == 22
    a, b = summary["replica_fingerprints"]
    assert a == b
    assert proc.stdout.count("distrain: done:") == 1  # rank 0 alone reports
    # and alone prints the lines above the bar: the plan, the model, each eval
    assert proc.stderr.count("distrain: model ") == 1
    assert proc.stderr.count("epoch 1 update 22: eval top-1") == 1


def test_eval_is_exactly_once_on_any_number_of_ranks(two_rank_run):
    tmp, _ = two_rank_run
    summary = json.loads((tmp / "run" / "summary.json").read_text())
    for nproc in (1, 2):
        out = checked(distrain(["eval", str(tmp / "run"), "--json"], cwd=tmp, nproc=nproc)).stdout
        metrics = json.loads(out.strip().splitlines()[-1])
        assert metrics["eval/samples"] == 360
        assert metrics["eval/top1"] == summary["eval/top1"]
        assert metrics["eval/loss"] == pytest.approx(summary["eval/loss"], rel=1e-6)


def test_one_wandb_run_with_the_jsonl_values(two_rank_run):
    tmp, _ = two_rank_run
    runs = read_offline_runs(tmp)
    assert len(runs) == 1
    logged = {}
    for row in runs[0]["history"]:
        logged.setdefault(row["_step"], {}).update({k: v for k, v in row.items() if not k.startswith("_")})
    image = {k: logged[max(logged)].pop(k) for k in list(logged[max(logged)]) if k.startswith("eval/confusion.")}
    assert image["eval/confusion._type"] == "image-file"  # the final confusion matrix
    expected = {}
    for e in read_jsonl(tmp / "run" / "metrics.jsonl"):
        expected.setdefault(e["step"], {}).update({k: v for k, v in e.items() if k not in ("step", "epoch")})
    assert logged == expected and any("eval/top1" in v for v in logged.values())


def test_accumulation_on_two_ranks_equals_one_big_batch(tmp_path):
    """2 ranks x micro-batch 8 x accumulation 2 == 1 rank x batch 32, after one update (no batch norm)."""
    import webdataset as wds

    from distrain.data.index import write_index

    shards = tmp_path / "shards"
    shards.mkdir()
    with wds.TarWriter(str(shards / "a-000000.tar")) as tw:
        for i in range(32):
            tw.write({"__key__": f"k{i:03d}", "png": image_bytes(i * 37), "cls": str(i % 3).encode()})
    write_index(shards, [("a-000000.tar", 32)], ["0", "1", "2"])
    params = {}
    for name, nproc, per_device, accumulation in (("big", 1, 32, 1), ("acc", 2, 8, 2)):
        doc = {
            "name": name,
            "run_dir": str(tmp_path / name),
            # Full-image "crops" without flips: both runs see identical pixels.
            "data": {"train": str(shards), "train_crop": 16, "scale": [1.0, 1.0], "ratio": [1.0, 1.0],
                     "hflip": False, "workers": 0},
            "model": {"name": "cifar_resnet20", "norm": "group"},
            "batch": {"per_device": per_device, "accumulation": accumulation},
            "optim": {"lr": 0.5, "base_batch": 32, "weight_decay": 1e-4},
            "schedule": {"epochs": 1, "decay": "constant"},
            "logging": {"wandb": False},
            "distributed": {"timeout_s": 120},
        }
        (tmp_path / f"{name}.yaml").write_text(json.dumps(doc))
        checked(distrain(["train", str(tmp_path / f"{name}.yaml")], cwd=tmp_path, nproc=nproc))
        params[name] = load_file(tmp_path / name / "checkpoints" / "update-00000001" / "model.safetensors")
    # The runs start from the same seeded init; compare the updates they made, relative to their size.
    torch.manual_seed(0)
    init = create_model(ModelConfig(name="cifar_resnet20", norm="group"), 3).state_dict()
    worst = 0.0
    for key, start in init.items():
        big, acc = params["big"][key] - start, params["acc"][key] - start
        assert big.abs().max() > 0, key
        worst = max(worst, float((acc - big).abs().max() / big.abs().max()))
    print(f"accumulation vs big batch: worst relative update difference {worst:.2e}")
    assert worst < 1e-4
