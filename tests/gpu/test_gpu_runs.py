"""Real `distrain` runs and benches on a GPU: ResNet-50 at 224 px with EMA and mixup, the host
synchronisations per update, `model.compile`, and `distrain bench step`."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import torch
from conftest import PYTHON, checked, distrain, read_jsonl, run_env
from gpu_helpers import NEEDS_GPU
from test_train import recipe

from distrain.parallel.setup import has_native_bf16

pytestmark = NEEDS_GPU

OBSERVED_RUN = Path(__file__).with_name("observed_run.py")


def observed_train(tmp: Path, cfg: str) -> dict:
    """``distrain train cfg`` under observed_run.py; its report."""
    report = tmp / "observed.json"
    proc = subprocess.run([PYTHON, str(OBSERVED_RUN), str(report), "train", cfg], cwd=tmp, env=run_env(tmp),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and report.exists(), proc.stdout[-3000:] + proc.stderr[-6000:]
    result = json.loads(report.read_text())
    assert result["rc"] == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return result


def finite_losses(run_dir: Path) -> list[float]:
    losses = [row["train/loss"] for row in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in row]
    assert losses and all(math.isfinite(x) for x in losses), losses
    return losses


def test_resnet50_at_224_px_with_ema_and_mixup(tmp_path, digits):
    # 1,437 digits upscaled to 224 px; 89 updates of 16 per epoch, stopped at update 100.
    cfg = recipe(tmp_path, digits,
                 data={"train_crop": 224, "eval_resize": 224, "eval_crop": 224, "workers": 4, "random_erasing": 0.25},
                 model={"name": "resnet50", "channels_last": True},
                 batch={"per_device": 16, "accumulation": 1},
                 train={"log_every": 10, "max_updates": 100, "label_smoothing": 0.1},
                 ema={"decay": 0.999}, mix={"mixup_alpha": 0.2, "cutmix_alpha": 1.0},
                 eval={"every_epochs": 1, "batch_size": 64}, logging={"wandb": False})
    seen = observed_train(tmp_path, cfg)
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert len(finite_losses(tmp_path / "run")) == 10 and max(r["step"] for r in rows) == 100
    assert any("eval/ema_top1" in r for r in rows if r["step"] == 100)
    # The loop's model, as the run used it: on the GPU, channels_last throughout, under autocast.
    dtype = "torch.bfloat16" if has_native_bf16(torch.device("cuda")) else "torch.float16"
    assert seen["conv"] == {"input_channels_last": [True], "weight_channels_last": [True], "device": ["cuda"],
                            "autocast": [dtype]}


def test_at_most_one_host_synchronisation_per_update(tmp_path, digits):
    """Steady state: the syncs of a 40-update run minus those of a 10-update run, over 30 updates.

    Both runs stay in epoch 0 (44 updates of 32) with no eval and no logging in between, so start-up,
    the final checkpoint and the end are the same in both.
    """
    counts = {}
    for updates in (10, 40):
        tmp = tmp_path / str(updates)
        tmp.mkdir()
        cfg = recipe(tmp, digits,
                     data={"train_crop": 64, "eval": "", "workers": 2, "random_erasing": 0.25},
                     model={"name": "resnet18", "channels_last": True},
                     batch={"per_device": 32, "accumulation": 1},
                     train={"log_every": 1000, "max_updates": updates, "label_smoothing": 0.1},
                     ema={"decay": 0.999}, mix={"mixup_alpha": 0.2, "cutmix_alpha": 1.0},
                     checkpoint={"every_epochs": 10}, logging={"wandb": False})
        counts[updates] = observed_train(tmp, cfg)
        assert counts[updates]["probe_counted"], "torch's sync debug mode reported no sync for .item()"
    per_update = (counts[40]["syncs"] - counts[10]["syncs"]) / 30
    print(f"\nhost synchronisations: {counts[10]['syncs']} in 10 updates, {counts[40]['syncs']} in 40: "
          f"{per_update:.2f} per update; sites (40 updates): {counts[40]['sync_sites']}")
    assert per_update <= 1, counts[40]["sync_sites"]


def test_model_compile_run(tmp_path, digits):
    cfg = recipe(tmp_path, digits, data={"train_crop": 32, "eval": ""}, model={"compile": True},
                 batch={"per_device": 32, "accumulation": 1}, train={"log_every": 5, "max_updates": 20},
                 logging={"wandb": False})
    env = {**run_env(tmp_path), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    proc = subprocess.run([PYTHON, "-m", "distrain", "train", cfg], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    checked(proc)
    assert len(finite_losses(tmp_path / "run")) == 4
    # Inductor compiled kernels for this run (its cache holds them).
    assert any(p.is_file() for p in (tmp_path / "inductor").rglob("*")), "torch.compile wrote no kernels"


def test_bench_step_on_the_gpu(tmp_path):
    out = tmp_path / "step.json"
    proc = checked(distrain(["bench", "step", "--model", "resnet50", "--res", "224", "--batch", "32",
                             "--updates", "20", "--json", str(out)], cwd=tmp_path))
    print("\n" + proc.stdout)
    result = json.loads(out.read_text())
    assert result["device"].startswith("cuda")
    assert all(0 < s < 10 for s in result["seconds_per_update"].values())
