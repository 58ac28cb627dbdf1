"""Knowledge distillation's building blocks: the losses and their reduction, padding, DeiT's two
heads, the teacher's inputs, and loading a frozen teacher (with its one-line refusals)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from distrain.config import Config, ModelConfig, dump
from distrain.errors import DistrainError
from distrain.models import create_model
from distrain.models.cifar_resnet import CifarResNet
from distrain.tricks.distill import (
    TeacherView,
    agreement_hits,
    check_distill,
    combine,
    enable_distilled_training,
    hard_distill_loss,
    load_teacher,
    renormalize,
    resize_for_teacher,
    soft_distill_loss,
    split_heads,
    teacher_fingerprint,
    valid_rows,
)
from distrain.tricks.mix import MixCut

B, C = 6, 10
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # data.mean/std's defaults (ImageNet)
CIFAR_MEAN, CIFAR_STD = [0.4914, 0.4822, 0.4465], [0.247, 0.243, 0.261]


def logits(seed: int, b: int = B, c: int = C, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(b, c, generator=torch.Generator().manual_seed(seed)) * scale


def refusal(call, *args, **kwargs) -> str:
    """The one-line DistrainError message of ``call(*args, **kwargs)``."""
    with pytest.raises(DistrainError) as e:
        call(*args, **kwargs)
    message = str(e.value)
    assert "\n" not in message
    return message


# --- losses ---------------------------------------------------------------------------------------


def test_alpha_zero_is_exactly_the_plain_loss():
    student, teacher, labels = logits(0).requires_grad_(), logits(1), torch.arange(B) % C
    label_loss = F.cross_entropy(student, labels)
    assert combine(label_loss, soft_distill_loss(student, teacher, 4.0), 0.0) is label_loss
    # Not even a non-finite distillation term gets in.
    assert combine(label_loss, torch.tensor(float("inf")), 0.0) is label_loss
    distill = hard_distill_loss(student, teacher)
    assert torch.equal(combine(label_loss, distill, 0.25), 0.75 * label_loss + 0.25 * distill)


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_soft_loss_and_its_gradient_match_a_hand_computation(T):
    s, t = logits(0).double(), logits(1).double()
    p_s, p_t = torch.softmax(s / T, 1), torch.softmax(t / T, 1)
    want = (p_t * (p_t.log() - p_s.log())).sum(1).mean() * T * T  # batchmean: sum over classes, mean over rows
    want_grad = T * (p_s - p_t) / B

    student = s.float().requires_grad_()
    loss = soft_distill_loss(student, t.float(), T)
    loss.backward()
    assert loss.dtype == torch.float32
    assert torch.allclose(loss.double(), want, rtol=1e-5, atol=1e-6)
    assert torch.allclose(student.grad.double(), want_grad, rtol=1e-4, atol=1e-7)

    # DeiT's DistillationLoss divides the summed KL by numel = B x C: ours over C.
    deit = F.kl_div(F.log_softmax(s / T, 1), F.log_softmax(t / T, 1), reduction="sum", log_target=True)
    deit = deit * T * T / s.numel()
    assert torch.allclose(loss.double() / C, deit, rtol=1e-5)


def test_soft_loss_is_zero_when_student_and_teacher_agree():
    s = logits(2)
    assert soft_distill_loss(s, s.clone(), 2.0).abs() < 1e-6
    assert soft_distill_loss(s, s + 5.0, 2.0).abs() < 1e-6  # softmax ignores a shift of all logits


def test_hard_loss_is_cross_entropy_on_the_teachers_argmax():
    s, t = logits(3), logits(4)
    assert torch.allclose(hard_distill_loss(s, t), F.cross_entropy(s, t.argmax(1)))
    assert torch.allclose(hard_distill_loss(s, t, label_smoothing=0.1),
                          F.cross_entropy(s, t.argmax(1), label_smoothing=0.1))


def test_padded_rows_are_excluded_from_both_losses():
    s, t = logits(5).requires_grad_(), logits(6)
    labels = torch.tensor([3, -1, 0, 7, -1, 2])
    mask = valid_rows(labels)
    assert mask.tolist() == [True, False, True, True, False, True]
    real = mask.nonzero().flatten()
    for loss_fn in (lambda *a, **k: soft_distill_loss(*a, 3.0, **k), hard_distill_loss):
        s.grad = None
        loss = loss_fn(s, t, mask=mask)
        assert torch.allclose(loss, loss_fn(s[real], t[real]))  # the mean over the real rows only
        loss.backward()
        assert s.grad[~mask].abs().sum() == 0 and s.grad[mask].abs().sum() > 0
        # A micro-batch of padding only: 0, not NaN (as the label losses).
        none = loss_fn(s, t, mask=torch.zeros(B, dtype=torch.bool))
        assert none.item() == 0.0


def test_valid_rows_of_mixed_soft_targets():
    images = torch.randn(B, 3, 8, 8)
    labels = torch.tensor([3, 1, 0, -1, 4, 2])
    _, targets, _ = MixCut(C, mixup_alpha=0.8, cutmix_alpha=0.0, prob=1.0)(images, labels, np.random.default_rng(0))
    assert targets.shape == (B, C)
    assert valid_rows(targets).tolist() == [True, True, True, False, True, True]


def test_bf16_logits_are_computed_in_float32():
    s, t = logits(7).bfloat16().requires_grad_(), logits(8).bfloat16()
    for loss, want in ((soft_distill_loss(s, t, 4.0), soft_distill_loss(s.float(), t.float(), 4.0)),
                       (hard_distill_loss(s, t), hard_distill_loss(s.float(), t.float()))):
        assert loss.dtype == torch.float32 and torch.equal(loss, want)
    soft_distill_loss(s, t, 4.0).backward()
    assert s.grad.dtype == torch.bfloat16


def test_agreement_counts_real_samples_with_the_same_top1():
    s, t = torch.eye(4) * 3, torch.eye(4)[[0, 1, 3, 2]]
    assert agreement_hits(s, t, torch.tensor([0, 1, 2, 3])).item() == 2
    assert agreement_hits(s, t, torch.tensor([0, -1, 2, 3])).item() == 1


def test_config_values_are_checked_by_key():
    check_distill("soft", 0.5, 4.0, [], [], 0)
    check_distill("hard", 1.0, 1.0, CIFAR_MEAN, CIFAR_STD, 224)
    assert refusal(check_distill, "kl", 0.5, 1.0, [], [], 0).startswith("distill.kind:")
    assert refusal(check_distill, "soft", 1.5, 1.0, [], [], 0).startswith("distill.alpha:")
    assert refusal(check_distill, "soft", 0.5, 0.0, [], [], 0).startswith("distill.temperature:")
    assert refusal(check_distill, "soft", 0.5, 1.0, [0.5], [], 0).startswith("distill.teacher_mean:")
    assert refusal(check_distill, "soft", 0.5, 1.0, [], [0.2, 0.0, 0.2], 0).startswith("distill.teacher_std:")
    assert refusal(check_distill, "soft", 0.5, 1.0, [], [], -1).startswith("distill.teacher_resolution:")


# --- DeiT's distillation token --------------------------------------------------------------------


def test_a_distilled_deit_trains_its_two_heads_apart_and_evaluates_their_average():
    torch.manual_seed(0)
    model = create_model(ModelConfig(name="timm/deit_tiny_distilled_patch16_224", kwargs={"img_size": 32}), C)
    images = torch.randn(2, 3, 32, 32)
    assert not isinstance(model.train()(images), tuple)  # timm's default: the average, even in training
    assert enable_distilled_training(model)
    out = model.train()(images)
    assert isinstance(out, tuple) and len(out) == 2
    cls, dist = split_heads(out)
    assert cls.shape == dist.shape == (2, C) and not torch.allclose(cls, dist)
    with torch.no_grad():
        # No dropout or drop-path: eval computes the same heads, and returns their average, as DeiT.
        assert torch.allclose(model.eval()(images), (cls + dist) / 2, atol=1e-5)

    # The class head learns from the labels only, the distillation head from the teacher only.
    F.cross_entropy(cls, torch.tensor([1, 2])).backward(retain_graph=True)
    assert model.head.weight.grad.abs().sum() > 0 and model.head_dist.weight.grad is None
    model.zero_grad(set_to_none=True)
    hard_distill_loss(dist, logits(9, 2)).backward()
    assert model.head_dist.weight.grad.abs().sum() > 0 and model.head.weight.grad is None


def test_other_models_have_one_head():
    model = CifarResNet(20, C)
    assert not enable_distilled_training(model)
    out = torch.randn(2, C)
    s1, s2 = split_heads(out)
    assert s1 is out and s2 is out
    with pytest.raises(TypeError):
        split_heads((out, out, out))


# --- the teacher's inputs -------------------------------------------------------------------------


def test_renormalize_is_per_channel_and_round_trips():
    x = torch.randn(2, 3, 4, 4)
    y = renormalize(x, MEAN, STD, CIFAR_MEAN, CIFAR_STD)
    raw = x * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)  # in [0, 1] units
    want = (raw - torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)) / torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    assert torch.allclose(y, want, atol=1e-6)
    assert torch.allclose(renormalize(y, CIFAR_MEAN, CIFAR_STD, MEAN, STD), x, atol=1e-5)
    assert renormalize(x, MEAN, STD, list(MEAN), tuple(STD)) is x
    half = renormalize(x.bfloat16().contiguous(memory_format=torch.channels_last), MEAN, STD, CIFAR_MEAN, CIFAR_STD)
    assert half.dtype == torch.bfloat16 and half.is_contiguous(memory_format=torch.channels_last)


def test_resize_for_teacher():
    x = torch.randn(2, 3, 32, 32)
    assert resize_for_teacher(x, 32) is x and resize_for_teacher(x, 0) is x
    up = resize_for_teacher(x, 64)
    assert up.shape == (2, 3, 64, 64)
    assert torch.allclose(up, F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False))
    assert resize_for_teacher(x.bfloat16(), 48).dtype == torch.bfloat16


# --- the teacher ----------------------------------------------------------------------------------


def trained_resnet20(num_classes: int = C, seed: int = 0) -> CifarResNet:
    """A CIFAR ResNet-20 with BN statistics unlike a fresh one's (as after training)."""
    torch.manual_seed(seed)
    model = CifarResNet(20, num_classes)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    return model


def run_dir(tmp_path, model: nn.Module, name: str = "cifar_resnet20"):
    """A finished distrain run: its config.yaml and exported model.safetensors."""
    run = tmp_path / "teacher_run"
    run.mkdir()
    (run / "config.yaml").write_text(dump(Config(model=ModelConfig(name=name))))
    save_file(model.state_dict(), run / "model.safetensors")
    return run


def assert_frozen_copy(teacher: nn.Module, source: nn.Module) -> None:
    assert not teacher.training and all(not m.training for m in teacher.modules())
    assert all(not p.requires_grad for p in teacher.parameters())
    got, want = teacher.state_dict(), source.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k].float(), want[k].float()) for k in want)


def test_load_teacher_from_a_state_dict_file(tmp_path):
    source = trained_resnet20()
    torch.save({"model": source.state_dict()}, tmp_path / "teacher.pth")
    rng = torch.get_rng_state()
    teacher = load_teacher(str(tmp_path / "teacher.pth"), C, "cpu", teacher_model="cifar_resnet20")
    assert torch.equal(torch.get_rng_state(), rng)  # the student's init and later draws are untouched
    assert_frozen_copy(teacher, source)
    half = load_teacher(str(tmp_path / "teacher.pth"), C, "cpu", torch.bfloat16, teacher_model="cifar_resnet20")
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    assert half.bn1.num_batches_tracked.dtype == torch.int64


def test_load_teacher_from_a_run_dir_and_its_checkpoint(tmp_path):
    source = trained_resnet20()
    run = run_dir(tmp_path, source)
    assert_frozen_copy(load_teacher(str(run), C), source)
    checkpoint = run / "checkpoints" / "update-00000010"  # a checkpoint's config is its run's
    checkpoint.mkdir(parents=True)
    save_file(source.state_dict(), checkpoint / "model.safetensors")
    assert_frozen_copy(load_teacher(str(checkpoint), C), source)


def test_the_teacher_gets_no_gradient_and_stays_unchanged(tmp_path):
    source = trained_resnet20()
    teacher = TeacherView(load_teacher(str(run_dir(tmp_path, source)), C), MEAN, STD, CIFAR_MEAN, CIFAR_STD)
    before = {k: v.clone() for k, v in teacher.teacher.state_dict().items()}
    torch.manual_seed(1)
    student = nn.Sequential(nn.Conv2d(3, 4, 3, 2), nn.Flatten(), nn.LazyLinear(C))
    images, labels = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    teacher.train()  # e.g. after an evaluation restores "training mode": the teacher stays in eval
    assert not teacher.teacher.training
    out = student(images)
    teacher_logits = teacher(images)
    assert not teacher_logits.requires_grad
    loss = combine(F.cross_entropy(out, labels), soft_distill_loss(out, teacher_logits, 4.0), 0.5)
    loss.backward()
    torch.optim.SGD(student.parameters(), lr=0.1).step()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    assert all(torch.equal(v, before[k]) for k, v in teacher.teacher.state_dict().items())  # BN statistics too
    want = teacher.teacher(renormalize(images, MEAN, STD, CIFAR_MEAN, CIFAR_STD))
    assert torch.equal(teacher_logits, want)


def test_the_teachers_own_eval_top1_through_the_eval_loop(tmp_path):
    from accelerate import Accelerator

    from distrain.data.device import ToDevice
    from distrain.engine.evaluate import evaluate

    source = trained_resnet20().eval()
    teacher = TeacherView(load_teacher(str(run_dir(tmp_path, source)), C), MEAN, STD, CIFAR_MEAN, CIFAR_STD)
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    to_device = ToDevice(MEAN, STD, torch.device("cpu"), False)
    with torch.no_grad():  # what the teacher predicts from the images normalised as it was trained
        predicted = source(renormalize(to_device({"image": images, "label": torch.zeros(8)})[0], MEAN, STD,
                                       CIFAR_MEAN, CIFAR_STD)).argmax(1)
    # 4 right, 2 wrong, 2 padding rows (label -1, as the eval stream pads): 4 / 6.
    labels = torch.cat([predicted[:4], (predicted[4:6] + 1) % C, torch.tensor([-1, -1])])
    batches = [{"image": images[k:k + 4], "label": labels[k:k + 4], "bad": []} for k in (0, 4)]
    metrics = evaluate(teacher, batches, to_device, Accelerator(cpu=True))
    assert metrics["eval/samples"] == 6 and metrics["eval/top1"] == pytest.approx(100 * 4 / 6)
    assert not teacher.teacher.training  # evaluate() restored "training mode": the teacher stays in eval


def test_teacher_view_resizes_and_casts_to_the_teachers_dtype():
    teacher = nn.Sequential(nn.Conv2d(3, 2, 1), nn.Flatten()).bfloat16().requires_grad_(False)
    out = TeacherView(teacher, MEAN, STD, resolution=8)(torch.randn(2, 3, 4, 4))
    assert out.shape == (2, 2 * 8 * 8) and out.dtype == torch.bfloat16


def test_a_teacher_with_another_class_count_is_refused(tmp_path):
    run = run_dir(tmp_path, trained_resnet20(num_classes=100))
    assert refusal(load_teacher, str(run), C) == "distill.teacher: the teacher has 100 classes, the data 10"


def test_a_teacher_of_another_architecture_is_refused_under_its_key(tmp_path):
    save_file(trained_resnet20().state_dict(), tmp_path / "w.safetensors")
    message = refusal(load_teacher, str(tmp_path / "w.safetensors"), C, teacher_model="cifar_resnet32")
    assert message.startswith(f"distill.teacher: {tmp_path / 'w.safetensors'} does not fit CifarResNet: ")
    assert message.endswith("; is the teacher's model (distill.teacher_model/teacher_kwargs, or its run's config) "
                            "the right one?")
    assert "model.pretrained" not in message


def test_unreadable_teacher_configs_are_refused(tmp_path):
    run = run_dir(tmp_path, trained_resnet20())
    config = run / "config.yaml"
    for text, why in (("model: [unclosed", "not valid YAML: while parsing a flow sequence"),
                      ("- a list", "no model section"),
                      ("model:\n  name: cifar_resnet21\n", "model.name: unknown model 'cifar_resnet21'")):
        config.write_text(text)
        message = refusal(load_teacher, str(run), C)
        assert message.startswith(f"distill.teacher: cannot read the teacher's model from {config} (")
        assert why in message
        assert message.endswith("name it with distill.teacher_model (and distill.teacher_kwargs)")
    # The escape hatch: name the model, and the weights of the run are still found.
    assert_frozen_copy(load_teacher(str(run), C, teacher_model="cifar_resnet20"), trained_resnet20())
    config.write_text(dump(Config(phases=[{"name": "teacher"}, {"name": "student"}])))
    assert "is a recipe of phases" in refusal(load_teacher, str(run), C)
    config.unlink()
    assert refusal(load_teacher, str(run), C).startswith(f"distill.teacher: {run} has no config.yaml")


def test_teacher_paths_and_names_are_refused_by_key(tmp_path):
    missing = tmp_path / "nope"
    assert refusal(load_teacher, str(missing), C) == f"distill.teacher: no such file or directory {missing}"
    save_file(trained_resnet20().state_dict(), tmp_path / "w.safetensors")
    weights = str(tmp_path / "w.safetensors")
    assert refusal(load_teacher, weights, C).startswith(f"distill.teacher: {weights} is a weights file; name")
    assert refusal(load_teacher, weights, C, teacher_kwargs={"x": 1}).startswith("distill.teacher_kwargs: needs")
    assert refusal(load_teacher, weights, C, teacher_model="cifar_resnet21").startswith(
        "distill.teacher_model: unknown model 'cifar_resnet21'")
    assert refusal(load_teacher, weights, C, teacher_model="cifar_resnet20", teacher_kwargs={"width": 2}) == (
        "distill.teacher_kwargs.width: cifar_resnet20 takes no argument 'width'")
    assert refusal(load_teacher, weights, C, teacher_model="timm/resnet18", teacher_kwargs={"pretrained": True}) == (
        "distill.teacher_kwargs.pretrained: distrain never downloads weights; load a file with distill.teacher")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text(dump(Config(model=ModelConfig(name="cifar_resnet20"))))
    message = refusal(load_teacher, str(unfinished), C)
    assert message.startswith("distill.teacher: ") and "model.pretrained" not in message


def test_fingerprint_is_the_sha256_of_the_weights(tmp_path):
    run = run_dir(tmp_path, trained_resnet20())
    digest = hashlib.sha256((run / "model.safetensors").read_bytes()).hexdigest()
    assert teacher_fingerprint(str(run)) == teacher_fingerprint(str(run / "model.safetensors")) == digest
    save_file(trained_resnet20(seed=1).state_dict(), run / "model.safetensors")
    assert teacher_fingerprint(str(run)) != digest
    assert refusal(teacher_fingerprint, str(tmp_path / "nope")).startswith("distill.teacher: no such file")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert refusal(teacher_fingerprint, str(empty)).startswith(f"distill.teacher: {empty} holds no model weights")


# --- inside `distrain train` ------------------------------------------------------------------------

TINY = dict(data={"train_crop": 8, "eval_resize": 8, "eval_crop": 8}, batch={"per_device": 32, "accumulation": 1},
            schedule={"epochs": 1, "warmup_epochs": 0}, train={"log_every": 11}, eval={"every_epochs": 1})


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, digits):
    """A trained digits teacher (a distrain run dir: config.yaml names its model)."""
    from conftest import checked, distrain
    from test_train import recipe

    tmp = tmp_path_factory.mktemp("teacher")
    checked(distrain(["train", recipe(tmp, digits, model={"name": "cifar_resnet32"}, **TINY)], cwd=tmp))
    return tmp / "run"


def _losses(run_dir) -> dict[int, float]:
    from conftest import read_jsonl

    return {e["step"]: e["train/loss"] for e in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in e}


@pytest.mark.slow
def test_alpha_zero_trains_exactly_the_plain_run_and_alpha_half_logs_its_parts(tmp_path, digits, teacher_run):
    from conftest import checked, distrain, read_jsonl
    from safetensors.torch import load_file
    from test_train import recipe

    before = teacher_fingerprint(str(teacher_run))
    runs = {}
    for name, distill in (("plain", {}), ("zero", {"teacher": str(teacher_run), "alpha": 0.0}),
                          ("soft", {"teacher": str(teacher_run), "alpha": 0.5, "temperature": 4.0})):
        (tmp_path / name).mkdir()
        cfg = recipe(tmp_path / name, digits, distill=distill, **TINY)
        runs[name] = (cfg, checked(distrain(["train", cfg], cwd=tmp_path / name)), tmp_path / name / "run")
    plain, zero, soft = (runs[n][2] for n in ("plain", "zero", "soft"))
    # The teacher is built under a forked RNG and adds 0 x its loss: the very same run.
    assert _losses(zero) == _losses(plain)
    a, b = load_file(plain / "model.safetensors"), load_file(zero / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    events = read_jsonl(soft / "metrics.jsonl")
    (start,) = [e for e in events if "teacher/top1" in e]  # once, before the first update
    assert start["step"] == 0 and start["teacher/samples"] == 360 and start["teacher/top1"] > 30
    assert "teacher/top1" in runs["soft"][1].stderr
    train = [e for e in events if "train/loss" in e]
    for e in train:  # each logged loss is the stated mixture of its two parts
        assert e["train/loss"] == pytest.approx(0.5 * e["train/loss_label"] + 0.5 * e["train/loss_distill"], rel=1e-5)
    assert [e for e in events if "eval/agreement" in e]
    assert teacher_fingerprint(str(teacher_run)) == before  # the teacher's file is untouched
    assert not any("teacher" in k for k in load_file(soft / "model.safetensors"))  # not inside the student

    # Stopped at update 20 and resumed: the same weights as the soft run, and the same losses in the
    # log windows that the stop did not cut (a window restarts at a resume).
    (tmp_path / "resumed").mkdir()
    cfg = recipe(tmp_path / "resumed", digits, distill={"teacher": str(teacher_run), "alpha": 0.5,
                                                         "temperature": 4.0}, **TINY)
    checked(distrain(["train", cfg, "train.max_updates=20"], cwd=tmp_path / "resumed"))
    checked(distrain(["train", cfg, "--resume", "auto"], cwd=tmp_path / "resumed"))
    resumed = tmp_path / "resumed" / "run"
    assert {k: v for k, v in _losses(resumed).items() if k != 22} == {k: v for k, v in _losses(soft).items() if k != 22}
    a, b = load_file(soft / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)

    # Other weights behind the same teacher path: resuming is refused like any changed setting.
    cfg = runs["soft"][0]
    other = tmp_path / "other-teacher"
    import shutil

    shutil.copytree(teacher_run, other, ignore=shutil.ignore_patterns("wandb*", "checkpoints", ".lock"))
    weights = load_file(other / "model.safetensors")
    weights["fc.bias"] += 1
    from safetensors.torch import save_file as save

    save(weights, other / "model.safetensors")
    proc = distrain(["train", cfg, "--resume", "auto", f"distill.teacher={other}", "train.max_updates=0"],
                    cwd=tmp_path / "soft")
    assert proc.returncode == 2 and "distill.teacher weights: sha256" in proc.stderr


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("distributed", [{}, pytest.param({"backend": "deepspeed", "zero_stage": 2},
                                                          marks=pytest.mark.deepspeed)], ids=["ddp", "zero2"])
def test_hard_distillation_with_mixing_on_two_ranks_keeps_replicas_equal(tmp_path, digits, teacher_run, distributed):
    """DDP and ZeRO-2 (ZeRO-3: test_deepspeed's technique test) keep the students equal across ranks."""
    from conftest import checked, distrain, read_jsonl
    from test_train import recipe

    cfg = recipe(tmp_path, digits, distill={"teacher": str(teacher_run), "kind": "hard", "alpha": 0.5},
                 mix={"mixup_alpha": 0.2, "cutmix_alpha": 1.0}, distributed={"timeout_s": 120, **distributed},
                 **{**TINY, "batch": {"per_device": 16, "accumulation": 2}})
    checked(distrain(["train", cfg], cwd=tmp_path, nproc=2))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    a, b = summary["replica_fingerprints"]
    assert summary["world_size"] == 2 and a == b
    assert 0 < summary["eval/agreement"] <= 100
    assert any("train/loss_distill" in e for e in read_jsonl(tmp_path / "run" / "metrics.jsonl"))
