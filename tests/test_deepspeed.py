"""DeepSpeed ZeRO 1/2/3 through Accelerate on 2 CPU ranks: parity with DDP, EMA, resume, export, eval."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import checked, distrain, free_port, read_jsonl
from safetensors.torch import load_file
from test_plan_schedule import cfg_with
from test_train import recipe

from distrain.errors import DistrainError
from distrain.parallel.deepspeed import generated_config, merge_user_config
from distrain.tricks.ema import _named_tensors

# A few updates of a BN ResNet with EMA, identical recipe under every backend. Parity runs use no
# accumulation: with accumulation, ZeRO-2/3 reduce gradients after every micro-batch where DDP adds
# them locally and reduces once. Both are right, but the summation orders differ by ~1e-8, and in a
# ReLU network with momentum one activation flipping sign turns that into a percent-level
# difference within a few updates (a DDP that all-reduces every micro-batch drifts from normal DDP
# just as much). Clipping too rounds differently (DeepSpeed divides by norm / max where torch
# multiplies by max / norm). So accumulation and clipping are compared over one update, where they
# must agree to fp32 noise, and the 6-update parity runs have neither.
RUN = {
    "batch": {"per_device": 32, "accumulation": 1},
    "train": {"max_updates": 6, "log_every": 1},
    "ema": {"decay": 0.9, "every": 1, "export": True},
    "distributed": {"timeout_s": 120},
}
# ZeRO-3 with real partitioning: without these thresholds DeepSpeed keeps small parameters whole.
ZERO3_JSON = {"zero_optimization": {"stage": "auto", "stage3_param_persistence_threshold": 0,
                                    "stage3_model_persistence_threshold": 0}, "train_batch_size": "auto"}


# --- the DeepSpeed config from the recipe --------------------------------------------------------


def test_generated_config_follows_the_recipe():
    cfg = cfg_with(train={"clip_grad_norm": 2.0}, distributed={"backend": "deepspeed", "zero_stage": 3,
                                                               "offload_optimizer": True, "offload_params": True})
    ds = generated_config(cfg, "bf16", per_device=32, accumulation=4, global_batch=1024)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (32, 4, 1024)
    assert ds["gradient_clipping"] == 2.0 and ds["bf16"] == {"enabled": True} and ds["fp16"] == {"enabled": False}
    z = ds["zero_optimization"]
    assert z["stage"] == 3 and z["offload_optimizer"]["device"] == "cpu" and z["offload_param"]["device"] == "cpu"


def test_user_json_auto_values_are_filled_and_extras_kept():
    ours = generated_config(cfg_with(), "no", per_device=16, accumulation=2, global_batch=64)
    merged = merge_user_config({"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {
        "stage": "auto", "reduce_bucket_size": 5e7}}, ours, "user.json")
    assert merged["train_micro_batch_size_per_gpu"] == 16 and merged["zero_optimization"]["stage"] == 2
    assert merged["zero_optimization"]["reduce_bucket_size"] == 5e7 and merged["gradient_accumulation_steps"] == 2


@pytest.mark.parametrize("user, message", [
    ({"train_micro_batch_size_per_gpu": 64}, "train_micro_batch_size_per_gpu = 64 contradicts batch.per_device"),
    ({"zero_optimization": {"stage": 3}}, "zero_optimization.stage = 3 contradicts distributed.zero_stage = 2"),
    ({"bf16": {"enabled": True}}, "bf16.enabled = True contradicts train.precision = False"),
    ({"gradient_clipping": 5.0}, "gradient_clipping = 5.0 contradicts train.clip_grad_norm = 0.0"),
])
def test_contradictions_name_both_keys(user, message):
    ours = generated_config(cfg_with(), "no", per_device=16, accumulation=2, global_batch=64)
    with pytest.raises(DistrainError, match=message.replace(".", r"\.").replace("(", r"\(")):
        merge_user_config(user, ours, "user.json")


@pytest.mark.parametrize("section, message", [
    ({"zero_stage": 4}, "distributed.zero_stage: must be 1, 2 or 3"),
    ({"zero_stage": 2, "offload_params": True}, "distributed.offload_params: needs distributed.zero_stage 3"),
    ({"deepspeed_config": "/nonexistent.json"}, "distributed.deepspeed_config: no such file"),
])
def test_bad_deepspeed_settings_name_the_key(section, message):
    with pytest.raises(DistrainError, match=message):
        cfg_with(distributed={"backend": "deepspeed", **section})


def test_ema_keeps_the_local_zero3_slice():
    lin = torch.nn.Linear(4, 3)
    lin.weight.ds_tensor = torch.zeros(6)  # what ZeRO-3 leaves on a rank: a flat slice
    lin.bias.ds_tensor, lin.bias.ds_persist = torch.zeros(2), True  # kept whole (small)
    tensors = _named_tensors(lin)
    assert tensors["weight"] is lin.weight.ds_tensor and tensors["bias"] is lin.bias


# --- 2-rank runs ----------------------------------------------------------------------------------

def _write_recipe(tmp, digits, name: str, distributed: dict, **sections) -> tuple[str, object]:
    recipe(tmp, digits, run_dir=str(tmp / name), **{**RUN, **sections, "distributed": {**RUN["distributed"], **distributed}})
    (tmp / "recipe.yaml").rename(tmp / f"{name}.yaml")
    return f"{name}.yaml", tmp / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory, digits):
    """One DDP run and one run per ZeRO stage of the same recipe on 2 gloo ranks."""
    tmp = tmp_path_factory.mktemp("ds")
    (tmp / "zero3.json").write_text(json.dumps(ZERO3_JSON))
    out = {}
    for name, distributed in [
        ("ddp", {}),
        ("zero1", {"backend": "deepspeed", "zero_stage": 1}),
        ("zero2", {"backend": "deepspeed", "zero_stage": 2}),
        ("zero3", {"backend": "deepspeed", "zero_stage": 3, "deepspeed_config": str(tmp / "zero3.json")}),
    ]:
        cfg, run_dir = _write_recipe(tmp, digits, name, distributed)
        proc = checked(distrain(["train", cfg], cwd=tmp, nproc=2))
        out[name] = (tmp, cfg, run_dir, proc)
    accumulate = {"batch": {"per_device": 16, "accumulation": 2},
                  "train": {**RUN["train"], "max_updates": 1, "clip_grad_norm": 1.0}}
    for name, distributed in [("ddp-acc2", {}), ("zero2-acc2", {"backend": "deepspeed", "zero_stage": 2})]:
        cfg, run_dir = _write_recipe(tmp, digits, name, distributed, **accumulate)
        proc = checked(distrain(["train", cfg], cwd=tmp, nproc=2))
        out[name] = (tmp, cfg, run_dir, proc)
    return out


def _raw_weights(run_dir):
    from distrain.engine.standalone import model_weights

    return model_weights(sorted((run_dir / "checkpoints").iterdir())[-1])


def _max_rel_diff(a: dict, b: dict) -> float:
    """||a - b|| / ||b|| over all floating-point tensors together (integer ones must be equal).

    Per tensor, near-zero ones (BN biases a few updates from 0) would turn fp32 summation-order
    noise of 1e-6 into large ratios.
    """
    assert a.keys() == b.keys()
    diff = norm = 0.0
    for k in a:
        if a[k].is_floating_point():
            diff += float((a[k].double() - b[k].double()).square().sum())
            norm += float(b[k].double().square().sum())
        else:
            assert torch.equal(a[k], b[k]), k
    return (diff / norm) ** 0.5


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.deepspeed
@pytest.mark.parametrize("stage", ["zero1", "zero2", "zero3"])
def test_zero_matches_ddp(runs, stage):
    _, _, ddp_dir, _ = runs["ddp"]
    _, _, run_dir, proc = runs[stage]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["updates"] == 6
    a, b = summary["replica_fingerprints"]
    assert a == b  # whole parameters and EMA weights, gathered under ZeRO-3
    ddp_losses = [e["train/loss"] for e in read_jsonl(ddp_dir / "metrics.jsonl") if "train/loss" in e]
    losses = [e["train/loss"] for e in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in e]
    assert losses == pytest.approx(ddp_losses, rel=1e-4)
    norms = [e["train/grad_norm"] for e in read_jsonl(run_dir / "metrics.jsonl") if "train/grad_norm" in e]
    ddp_norms = [e["train/grad_norm"] for e in read_jsonl(ddp_dir / "metrics.jsonl") if "train/grad_norm" in e]
    assert norms == pytest.approx(ddp_norms, rel=1e-4)
    # Raw weights (ZeRO partitions merged by zero_to_fp32) and the exported EMA weights.
    raw = _max_rel_diff(_raw_weights(run_dir), _raw_weights(ddp_dir))
    ema = _max_rel_diff(load_file(run_dir / "model.safetensors"), load_file(ddp_dir / "model.safetensors"))
    print(f"{stage} vs DDP after 6 updates: worst relative difference of raw weights {raw:.2e}, EMA {ema:.2e}")
    assert raw < 1e-4 and ema < 1e-4  # fp32 summation order only
    ddp_summary = json.loads((ddp_dir / "summary.json").read_text())
    assert summary["eval/top1"] == pytest.approx(ddp_summary["eval/top1"], abs=0.6)  # at most 2 of 360 flip


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.deepspeed
def test_zero2_accumulation_matches_ddp(runs):
    _, _, ddp_dir, _ = runs["ddp-acc2"]
    _, _, run_dir, proc = runs["zero2-acc2"]
    assert "x 16 x 2 accumulation" in proc.stderr
    (norm,) = [e["train/grad_norm"] for e in read_jsonl(run_dir / "metrics.jsonl") if "train/grad_norm" in e]
    (ddp_norm,) = [e["train/grad_norm"] for e in read_jsonl(ddp_dir / "metrics.jsonl") if "train/grad_norm" in e]
    assert norm == pytest.approx(ddp_norm, rel=1e-6) and norm > 1.0  # so clipping at 1.0 acted
    raw = _max_rel_diff(_raw_weights(run_dir), _raw_weights(ddp_dir))
    print(f"zero2 vs DDP after 1 clipped update of 2 micro-batches: relative difference {raw:.2e}")
    assert raw < 1e-6


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.deepspeed
def test_zero3_partitions_and_keeps_ema_slices(runs):
    _, _, run_dir, _ = runs["zero3"]
    ckpt = sorted((run_dir / "checkpoints").iterdir())[-1]
    slices = [load_file(ckpt / f"ema-rank{r}.safetensors") for r in (0, 1)]
    weight = "layers.0.conv1.weight"  # 16 x 16 x 3 x 3 = 2304 values, half on each rank
    assert slices[0][weight].numel() == slices[1][weight].numel() == 1152
    assert not (ckpt / "ema.safetensors").exists()


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.deepspeed
def test_zero3_resume_is_exact(runs, digits):
    tmp, cfg, run_dir, _ = runs["zero3"]
    resumed = tmp / "zero3-resumed"
    overrides = [f"run_dir={resumed}"]
    checked(distrain(["train", cfg, *overrides, "train.max_updates=3"], cwd=tmp, nproc=2))
    proc = checked(distrain(["train", cfg, *overrides, "--resume", "auto"], cwd=tmp, nproc=2))
    assert "resuming from" in proc.stderr
    whole = [e for e in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in e]
    parts = [e for e in read_jsonl(resumed / "metrics.jsonl") if "train/loss" in e]
    assert [e["step"] for e in parts] == [1, 2, 3, 4, 5, 6]
    assert [e["train/loss"] for e in parts] == [e["train/loss"] for e in whole]
    assert _max_rel_diff(_raw_weights(resumed), _raw_weights(run_dir)) == 0.0
    assert _max_rel_diff(load_file(resumed / "model.safetensors"), load_file(run_dir / "model.safetensors")) == 0.0


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.deepspeed
def test_export_and_single_process_eval(runs):
    tmp, _, run_dir, _ = runs["zero2"]
    checked(distrain(["export", str(run_dir), "--out", "zero2.pt"], cwd=tmp))
    exported = torch.load(tmp / "zero2.pt", weights_only=True)
    assert _max_rel_diff(exported, _raw_weights(run_dir)) == 0.0
    from distrain.config import ModelConfig
    from distrain.models import create_model

    model = create_model(ModelConfig(name="cifar_resnet20"), 10)
    model.load_state_dict(exported)  # plain PyTorch
    out = checked(distrain(["eval", str(run_dir), "--json"], cwd=tmp))
    metrics = json.loads(out.stdout.strip().splitlines()[-1])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert metrics["eval/top1"] == pytest.approx(summary["eval/top1"]) and metrics["eval/samples"] == 360


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.deepspeed
def test_every_technique_under_zero3_through_distrain_launch(tmp_path, digits, runs):
    from test_recipe_dist import TECHNIQUES

    (tmp_path / "zero3.json").write_text(json.dumps(ZERO3_JSON))
    # Distillation too: the ZeRO-2 run above is the teacher, replicated outside DeepSpeed's engine.
    teacher = runs["zero2"][2]
    # And per-block LRs (layer decay, head scale) with gradual unfreezing: parameter groups held at LR 0
    # inside DeepSpeed's flat partitions, no engine rebuilt.
    cfg = recipe(tmp_path, digits, optim={"name": "sgd", "lr": 0.2, "base_batch": 64, "layer_decay": 0.9,
                                          "head_lr_scale": 2.0}, **{
        **TECHNIQUES, "distributed": {"timeout_s": 120, "deepspeed_config": str(tmp_path / "zero3.json")},
        "distill": {"teacher": str(teacher), "alpha": 0.5, "temperature": 2.0},
        "transfer": {"mode": "gradual", "unfreeze_every": 0.25}})
    proc = checked(distrain(["launch", cfg, "--nproc-per-node", "2", "--backend", "deepspeed", "--zero-stage", "3",
                             "--master-port", str(free_port())], cwd=tmp_path))
    assert "DeepSpeed ZeRO-3" in proc.stderr and "2 process(es) x 16 x 2 accumulation" in proc.stderr
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["updates"] == 25 and summary["replica_fingerprints"][0] == summary["replica_fingerprints"][1]
    assert {"eval/top1", "eval/ema_top1", "eval/agreement"} <= summary.keys()
    train = [e for e in read_jsonl(run / "metrics.jsonl") if "train/loss" in e]
    assert [e["train/resolution"] for e in train] == [12] * 4 + [16]
    assert all("train/loss_distill" in e for e in train)
    # The FixRes phase re-prepares a frozen model under ZeRO-3 and trains only what it adapts.
    fixres = json.loads((run / "fixres" / "summary.json").read_text())
    assert fixres["updates"] == 22 and fixres["replica_fingerprints"][0] == fixres["replica_fingerprints"][1]
    main, tuned = load_file(run / "model.safetensors"), load_file(run / "fixres" / "model.safetensors")
    changed = {k.rsplit(".", 1)[0] for k in main if not torch.equal(main[k], tuned[k])}
    assert changed == {"fc", "layers.8.bn2"}


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.deepspeed
def test_accelerate_deepspeed_launch_config_selects_zero(tmp_path, digits):
    import subprocess
    import sys

    from conftest import REPO, run_env

    cfg = recipe(tmp_path, digits, train={"max_updates": 3}, logging={"wandb": False}, distributed={"timeout_s": 120})
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "launch" / "accelerate" / "deepspeed_zero2_offload.yaml"), "--num_processes", "2",
           "--main_process_port", str(free_port()), "-m", "distrain", "train", cfg]
    proc = checked(subprocess.run(cmd, cwd=tmp_path, env=run_env(tmp_path), capture_output=True, text=True, timeout=600))
    assert "DeepSpeed ZeRO-2" in proc.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["updates"] == 3
    assert summary["replica_fingerprints"][0] == summary["replica_fingerprints"][1]


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.deepspeed
@pytest.mark.parametrize("stage", [2, 3])
def test_bf16_export_is_the_fp32_master_weights(tmp_path, digits, stage):
    """Under DeepSpeed bf16 the module holds bf16 copies; the export must be the fp32 masters
    (what zero_to_fp32 reads from the checkpoint), not those copies widened to fp32."""
    distributed = {"backend": "deepspeed", "zero_stage": stage}
    if stage == 3:
        (tmp_path / "zero3.json").write_text(json.dumps(ZERO3_JSON))
        distributed["deepspeed_config"] = str(tmp_path / "zero3.json")
    cfg, run_dir = _write_recipe(tmp_path, digits, "bf16", distributed, ema={"decay": 0.0},
                                 train={**RUN["train"], "max_updates": 3, "precision": "bf16"})
    checked(distrain(["train", cfg], cwd=tmp_path, nproc=2))
    exported, masters = load_file(run_dir / "model.safetensors"), _raw_weights(run_dir)
    weights = [k for k in masters if k.endswith(".weight")]
    assert weights and all(exported[k].dtype == torch.float32 for k in weights)
    assert all(torch.equal(exported[k], masters[k].float()) for k in weights)
    # Not bf16 values in fp32 clothing: the masters carry bits that bf16 rounds away.
    assert any(not torch.equal(exported[k], exported[k].bfloat16().float()) for k in weights)
    if stage == 2:
        # A bf16 checkpoint resumes under the safe loader's allowlist (its optimizer files carry
        # DeepSpeed's loss-scaler and partition types).
        proc = checked(distrain(["train", cfg, "--resume", "auto", "train.max_updates=4"], cwd=tmp_path, nproc=2))
        assert "resuming from" in proc.stderr
        assert json.loads((run_dir / "summary.json").read_text())["updates"] == 4
