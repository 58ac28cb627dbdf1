"""``model.pretrained``: what loads from where, what is re-initialised on purpose, and what is refused."""

from __future__ import annotations

import json
import os

import pytest
import timm
import torch
import torchvision
from conftest import checked, distrain
from safetensors.torch import save_file
from test_train import recipe
from torch import nn

from distrain.errors import DistrainError
from distrain.models.cifar_resnet import CifarResNet
from distrain.models.pretrained import classifier_names, load_pretrained


def _trained(num_classes: int = 10, seed: int = 0) -> nn.Module:
    """A CIFAR ResNet-20 whose BN statistics and counters differ from a fresh one's."""
    torch.manual_seed(seed)
    model = CifarResNet(20, num_classes)
    for m in model.modules():  # as after training steps (a forward pass costs a second on a busy CPU)
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.num_batches_tracked += 1
    return model


def _fresh(num_classes: int = 10) -> nn.Module:
    torch.manual_seed(123)  # another init than _trained's
    return CifarResNet(20, num_classes)


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same(got: dict, want: dict, keys=None) -> None:
    for k in keys if keys is not None else want:
        assert torch.equal(got[k], want[k]), k


def test_round_trip_from_safetensors_with_bn_statistics(tmp_path):
    source = _weights(_trained())
    save_file(source, tmp_path / "w.safetensors")
    model = _fresh()
    report = load_pretrained(model, str(tmp_path / "w.safetensors"), [], False)
    assert report.path == tmp_path / "w.safetensors" and report.loaded == len(source)
    assert report.reinitialised == [] and report.ignored == []
    _assert_same(model.state_dict(), source)
    assert model.state_dict()["bn1.num_batches_tracked"].item() == 1  # buffers came too
    assert str(report) == f"pretrained: {len(source)} tensors from {tmp_path / 'w.safetensors'}"


@pytest.mark.parametrize("nesting, prefix", [
    ("state_dict", "module."), ("model", ""), ("model_state", "_orig_mod.module.")])
def test_torch_save_nested_and_prefixed(tmp_path, nesting, prefix):
    source = _weights(_trained())
    torch.save({"epoch": 3, nesting: {prefix + k: v for k, v in source.items()}}, tmp_path / "ckpt.pth")
    model = _fresh()
    load_pretrained(model, str(tmp_path / "ckpt.pth"), [], False)
    _assert_same(model.state_dict(), source)


def test_torchvision_state_dict_file(tmp_path):
    # As a user saves torchvision's weights: a plain state dict, torch.save'd.
    torch.manual_seed(0)
    source = torchvision.models.mobilenet_v3_small(num_classes=1000).state_dict()
    torch.save(source, tmp_path / "mobilenet.pth")
    model = torchvision.models.mobilenet_v3_small(num_classes=7)
    fresh_head = _weights(model)
    report = load_pretrained(model, str(tmp_path / "mobilenet.pth"), [], False)
    assert report.reinitialised == ["classifier.3.weight", "classifier.3.bias"]
    _assert_same(model.state_dict(), fresh_head, report.reinitialised)
    _assert_same(model.state_dict(), source, [k for k in source if not k.startswith("classifier.3.")])


def test_run_and_checkpoint_directories(tmp_path):
    source = _weights(_trained())
    run = tmp_path / "run"
    (run / "checkpoints" / "update-00000004").mkdir(parents=True)
    save_file(source, run / "model.safetensors")
    model = _fresh()
    assert load_pretrained(model, str(run), [], False).path == run / "model.safetensors"
    _assert_same(model.state_dict(), source)

    # A checkpoint Accelerate wrote without safe serialisation; and a run that has not exported yet.
    ckpt = run / "checkpoints" / "update-00000004"
    (ckpt / "trainer_state.json").write_text(json.dumps({"update": 4}))
    torch.save(source, ckpt / "pytorch_model.bin")
    model = _fresh()
    assert load_pretrained(model, str(ckpt), [], False).path == ckpt / "pytorch_model.bin"
    _assert_same(model.state_dict(), source)
    (run / "model.safetensors").unlink()
    with pytest.raises(DistrainError, match=f"^model.pretrained: {run} has no model.safetensors .* e.g. {ckpt}$"):
        load_pretrained(_fresh(), str(run), [], False)
    with pytest.raises(DistrainError, match=f"^model.pretrained: {tmp_path} is a directory without model weights"):
        load_pretrained(_fresh(), str(tmp_path), [], False)


def test_other_class_count_reinitialises_the_classifier(tmp_path):
    source = _weights(_trained(num_classes=10))
    save_file(source, tmp_path / "w.safetensors")
    model = _fresh(num_classes=4)
    fresh = _weights(model)
    report = load_pretrained(model, str(tmp_path / "w.safetensors"), [], False)
    assert report.reinitialised == ["fc.weight", "fc.bias"] and report.loaded == len(source) - 2
    _assert_same(model.state_dict(), fresh, ["fc.weight", "fc.bias"])
    _assert_same(model.state_dict(), source, [k for k in source if not k.startswith("fc.")])
    assert "classifier fc.weight, fc.bias re-initialised" in str(report)


def test_reset_classifier_with_the_same_class_count(tmp_path):
    source = _weights(_trained())
    save_file(source, tmp_path / "w.safetensors")
    model = _fresh()
    fresh = _weights(model)
    report = load_pretrained(model, str(tmp_path / "w.safetensors"), [], True)
    assert report.reinitialised == ["fc.weight", "fc.bias"]
    _assert_same(model.state_dict(), fresh, ["fc.weight", "fc.bias"])
    # A headless backbone file (no classifier at all) loads the same way.
    save_file({k: v for k, v in source.items() if not k.startswith("fc.")}, tmp_path / "backbone.safetensors")
    report = load_pretrained(_fresh(), str(tmp_path / "backbone.safetensors"), [], True)
    assert report.reinitialised == ["fc.weight", "fc.bias"]


def test_ignore_globs_skip_tensors_of_either_side(tmp_path):
    source = _weights(_trained())
    source["aux.weight"] = torch.zeros(3)  # only in the file
    save_file(source, tmp_path / "w.safetensors")
    model = _fresh()
    fresh = _weights(model)
    report = load_pretrained(model, str(tmp_path / "w.safetensors"), ["layers.0.bn*", "aux.*"], False)
    skipped = [k for k in fresh if k.startswith("layers.0.bn")]
    assert report.ignored == [*skipped, "aux.weight"] and len(skipped) == 10
    _assert_same(model.state_dict(), fresh, skipped)
    _assert_same(model.state_dict(), source, [k for k in fresh if k not in skipped])
    with pytest.raises(DistrainError, match=r"^model.pretrained_ignore: 'head\.\*' matches no tensor of the model or"):
        load_pretrained(_fresh(), str(tmp_path / "w.safetensors"), ["aux.*", "head.*"], False)


def test_missing_unexpected_and_reshaped_tensors_are_listed(tmp_path):
    source = _weights(_trained())
    del source["conv1.weight"], source["bn1.running_var"]
    source.update({f"extra.{i}": torch.zeros(1) for i in range(7)})
    source["layers.0.conv1.weight"] = torch.zeros(16, 16, 1, 1)
    save_file(source, tmp_path / "w.safetensors")
    with pytest.raises(DistrainError) as error:
        load_pretrained(_fresh(), str(tmp_path / "w.safetensors"), [], False)
    assert str(error.value) == (
        f"model.pretrained: {tmp_path / 'w.safetensors'} does not fit CifarResNet: 2 missing in the file "
        "(conv1.weight, bn1.running_var); 7 unexpected in the file (extra.0, extra.1, extra.2, extra.3, extra.4 and 2 "
        "more); 1 of another shape (layers.0.conv1.weight (file [16, 16, 1, 1] vs model [16, 16, 3, 3])); skip "
        "tensors on purpose with model.pretrained_ignore (globs) or model.reset_classifier")


def test_old_state_dict_without_num_batches_tracked(tmp_path):
    # PyTorch < 0.4.1 files (torchvision's first ImageNet weights) lack the counter; torch fills it.
    source = {k: v for k, v in _weights(_trained()).items() if not k.endswith("num_batches_tracked")}
    save_file(source, tmp_path / "w.safetensors")
    model = _fresh()
    load_pretrained(model, str(tmp_path / "w.safetensors"), [], False)
    _assert_same(model.state_dict(), source)


def test_missing_path_says_nothing_is_downloaded(tmp_path):
    with pytest.raises(DistrainError) as error:
        load_pretrained(_fresh(), str(tmp_path / "resnet50.pth"), [], False)
    assert str(error.value) == (
        f"model.pretrained: no such file or directory {tmp_path / 'resnet50.pth'} (distrain never downloads: fetch "
        "torchvision/timm weights on a machine with internet, e.g. torchvision.models.ResNet50_Weights.IMAGENET1K_V2"
        ".get_state_dict() saved with torch.save, and point model.pretrained at the file)")


class _Exploit:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_code_is_refused_and_never_runs(tmp_path):
    marker, path = tmp_path / "pwned", tmp_path / "resnet.pth"
    torch.save({"state_dict": {"fc.weight": torch.zeros(1)}, "hook": _Exploit(marker)}, path)
    with pytest.raises(DistrainError) as error:
        load_pretrained(_fresh(), str(path), [], False)
    assert str(error.value) == (f"model.pretrained: cannot load {path}: it contains pickled code (posix.system); "
                                "nothing from it was run")
    assert not marker.exists()


@pytest.mark.parametrize("content, found", [
    ([1, 2], "found list"),
    ({"epoch": 3, "optimizer": {"lr": 0.1}}, "found keys epoch, optimizer"),
])
def test_a_file_without_a_state_dict(tmp_path, content, found):
    torch.save(content, tmp_path / "x.pt")
    with pytest.raises(DistrainError, match=f"^model.pretrained: {tmp_path / 'x.pt'} holds no state dict .*; {found}$"):
        load_pretrained(_fresh(), str(tmp_path / "x.pt"), [], False)


def test_a_corrupt_file(tmp_path):
    (tmp_path / "w.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(DistrainError, match=f"^model.pretrained: cannot load {tmp_path / 'w.safetensors'} \\("):
        load_pretrained(_fresh(), str(tmp_path / "w.safetensors"), [], False)


def test_classifier_names():
    assert classifier_names(CifarResNet(20, 10)) == ["fc.weight", "fc.bias"]
    assert classifier_names(torchvision.models.mobilenet_v3_small()) == ["classifier.3.weight", "classifier.3.bias"]
    # timm's own answer, both heads of a distilled DeiT.
    deit = timm.create_model("deit_tiny_distilled_patch16_224", num_classes=5, img_size=32, depth=1)
    assert classifier_names(deit) == ["head.weight", "head.bias", "head_dist.weight", "head_dist.bias"]
    with pytest.raises(DistrainError, match="^model.name: cannot tell the classifier of Sequential"):
        classifier_names(nn.Sequential(nn.Conv2d(3, 4, 1), nn.Flatten()))


def test_trained_export_and_checkpoint_load_into_a_fresh_model(tmp_path, digits):
    cfg = recipe(tmp_path, digits, data={"eval": "", "train_crop": 8, "workers": 0}, train={"max_updates": 2},
                 logging={"wandb": False, "progress": False})
    checked(distrain(["train", cfg], cwd=tmp_path))
    run = tmp_path / "run"
    exported = _fresh()
    report = load_pretrained(exported, str(run), [], False)
    assert report.path == run / "model.safetensors" and report.reinitialised == []
    from_checkpoint = _fresh()
    load_pretrained(from_checkpoint, str(run / "checkpoints" / "update-00000002"), [], False)
    _assert_same(from_checkpoint.state_dict(), exported.state_dict())
    assert not torch.equal(exported.state_dict()["fc.weight"], _fresh().state_dict()["fc.weight"])
