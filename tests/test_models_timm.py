"""timm models through model.*, model.kwargs, the config-time check_model and model_summary."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from distrain.config import ModelConfig
from distrain.errors import DistrainError
from distrain.models import NORM_LAYERS, check_model, create_meta_model, create_model, model_summary
from distrain.models.factory import _TV_CLASSIFIER, _TV_OWN_DROPOUT, _tv_family, model_names

VIT = "timm/vit_tiny_patch16_224"


def build(name: str, num_classes: int = 10, **options) -> nn.Module:
    return create_model(ModelConfig(name=name, **options), num_classes)


def meta(name: str, **options) -> nn.Module:
    return create_meta_model(ModelConfig(name=name, **options), 10)


def refusal(**options) -> str:
    """check_model's one-line refusal of ``ModelConfig(**options)``."""
    with pytest.raises(DistrainError) as e:
        check_model(ModelConfig(**options))
    message = str(e.value)
    assert "\n" not in message
    return message


# --- names and kwargs -----------------------------------------------------------------------------


def test_a_timm_model_builds_with_its_kwargs_and_trains():
    model = build(VIT, 7, kwargs={"img_size": 32})  # 2x2 patches of 16 px
    assert type(model).__name__ == "VisionTransformer" and model.head.out_features == 7
    model.train()
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7)
    out.sum().backward()
    check_model(ModelConfig(name=VIT, kwargs={"img_size": 32}))


def test_unknown_timm_names_get_the_closest():
    message = refusal(name="timm/vit_smal_patch16_224")
    assert message.startswith("model.name: unknown model 'timm/vit_smal_patch16_224'")
    assert "timm/vit_small_patch16_224" in message
    assert "timm/resnet50" in model_names()
    check_model(ModelConfig(name="timm/resnet18.a1_in1k"))  # a pretrained tag names the same architecture


def test_kwargs_the_model_does_not_take_are_refused_by_name():
    message = refusal(name="timm/vit_small_patch16_224", kwargs={"foo": 1})
    assert message == "model.kwargs.foo: timm/vit_small_patch16_224 takes no argument 'foo'"
    assert refusal(name="resnet18", kwargs={"img_size": 32}).startswith("model.kwargs.img_size: resnet18 takes no")
    assert refusal(name="cifar_resnet20", kwargs={"width": 2}).startswith("model.kwargs.width: cifar_resnet20 takes no")
    # swin_t's builder sets stochastic_depth_prob itself.
    message = refusal(name="swin_t", kwargs={"stochastic_depth_prob": 0.3})
    assert message == "model.kwargs.stochastic_depth_prob: swin_t sets 'stochastic_depth_prob' itself"


@pytest.mark.parametrize("key, words", [
    ("pretrained", ["model.kwargs.pretrained:", "never downloads", "model.pretrained"]),
    ("weights", ["model.kwargs.weights:", "model.pretrained"]),
    ("num_classes", ["model.kwargs.num_classes:", "data.num_classes"]),
])
def test_kwargs_that_distrain_sets_elsewhere_are_refused(key, words):
    message = refusal(name=VIT, kwargs={key: True})
    assert all(w in message for w in words), message


def test_a_kwarg_and_the_option_that_sets_it_cannot_both_be_given():
    assert refusal(name=VIT, dropout=0.1, kwargs={"drop_rate": 0.2}).startswith("model.kwargs.drop_rate: model.dropout")
    assert meta(VIT, kwargs={"drop_rate": 0.2}).head_drop.p == 0.2  # alone, it passes through


def test_builder_failures_name_the_key():
    message = refusal(name=VIT, kwargs={"embed_dim": 100})  # not divisible among its 3 heads
    assert message.startswith("model.kwargs {'embed_dim': 100}: building timm/vit_tiny_patch16_224 failed:"), message


# --- drop path, dropout, zero init ----------------------------------------------------------------


def test_timm_models_take_drop_path_and_dropout_through_their_own_arguments():
    model = meta(VIT, drop_path_rate=0.2, dropout=0.1)
    rates = [getattr(b.drop_path1, "drop_prob", 0.0) for b in model.blocks]  # block 0: nn.Identity
    assert rates == pytest.approx(torch.linspace(0, 0.2, 12).tolist())
    assert model.head_drop.p == 0.1
    message = refusal(name="timm/densenet121", drop_path_rate=0.1)
    assert message.startswith("model.drop_path_rate: timm/densenet121 takes no")


def test_zero_init_residual_is_timms_zero_init_last():
    model = build("timm/resnet18", zero_init_residual=True, kwargs={"zero_init_last": True})
    assert all((b.bn2.weight == 0).all() for b in (*model.layer1, *model.layer4))
    assert refusal(name=VIT, zero_init_residual=True).startswith(f"model.zero_init_residual: {VIT} takes no")


# --- norms ----------------------------------------------------------------------------------------


def test_timm_resnets_take_the_batch_independent_norms():
    model = build("timm/resnet18", norm="layer")
    assert not any(isinstance(m, _BatchNorm) for m in model.modules())
    assert all(m.num_groups == 1 for m in model.modules() if isinstance(m, nn.GroupNorm))
    model.train()
    x = torch.randn(3, 3, 64, 64)
    assert torch.allclose(model(x)[:1], model(x[:1]), atol=1e-5)


def test_timm_norm_conversions_and_refusals():
    from timm.layers import LayerNorm2d, SyncBatchNormAct

    sync = meta("timm/efficientnet_b0", norm="sync_batch")
    # timm's converter keeps the activation fused into BatchNormAct2d.
    assert sync.bn1.__class__ is SyncBatchNormAct and isinstance(sync.bn1.act, nn.SiLU)
    assert "BatchNormAct2d" in refusal(name="timm/efficientnet_b0", norm="ghost", ghost_batch_size=8)
    message = refusal(name="timm/vit_small_patch16_224", norm="layer")
    assert message.startswith("model.norm: timm/vit_small_patch16_224 keeps its own norm layers (LayerNorm)")
    assert "use model.norm=batch" in message
    assert isinstance(LayerNorm2d(4), NORM_LAYERS)


# --- outputs the training loop cannot use ---------------------------------------------------------


def test_models_with_several_outputs_are_built_for_one_or_refused():
    # torchvision's auxiliary heads are off: a single logits tensor in training mode.
    check_model(ModelConfig(name="googlenet"))
    check_model(ModelConfig(name="inception_v3"))
    check_model(ModelConfig(name="timm/deit_tiny_distilled_patch16_224"))  # the average of its two heads
    message = refusal(name="googlenet", kwargs={"aux_logits": True})
    assert message.startswith("model.name: googlenet with model.kwargs returns a GoogLeNetOutputs in training mode")
    assert refusal(name="timm/resnet18", kwargs={"features_only": True}).startswith("model.name: timm/resnet18")
    assert "returns shape (2, 197, 10)" in refusal(name=VIT, kwargs={"global_pool": ""})


def test_meta_models_have_no_real_tensors_and_leave_timm_importable():
    for name in ("regnet_x_400mf", "timm/swinv2_cr_tiny_224", "cifar_resnet20"):  # meta-hostile builders too
        model = meta(name, dropout=0.1)
        assert {t.device.type for t in (*model.parameters(), *model.buffers())} == {"meta"}, name
    assert torch.zeros(1).device.type == "cpu"


def test_every_torchvision_model_has_a_dropout_route():
    import torchvision

    for name in torchvision.models.list_models(module=torchvision.models):
        assert _tv_family(name) in _TV_OWN_DROPOUT or _tv_family(name) in _TV_CLASSIFIER, name


def test_check_model_builds_no_real_weights_and_leaves_the_rng_alone():
    # No timed assertion (the machines are noisy): what keeps validation cheap is that the model
    # is built on the meta device, with no memory and no init work.
    configs = [ModelConfig(name="timm/vit_small_patch16_224", drop_path_rate=0.1),
               ModelConfig(name="resnet50", norm="group", drop_path_rate=0.1, dropout=0.2)]
    assert all(p.is_meta for c in configs for p in create_meta_model(c, 1000).parameters())
    torch.manual_seed(0)
    expected = torch.rand(1)
    torch.manual_seed(0)
    for c in configs:
        check_model(c)
    assert torch.equal(torch.rand(1), expected)


# --- summary --------------------------------------------------------------------------------------


def test_model_summary_counts_without_touching_the_model():
    model = build("cifar_resnet20").train()
    model.layers[0].eval()
    model.fc.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    line = model_summary(model, 32, "cifar_resnet20")
    assert line == "cifar_resnet20: 0.27M parameters (0.27M trainable), 0.0408 GMACs per image at 32x32"
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # BN statistics included
    assert model.training and not model.layers[0].training and model.layers[1].training
    assert model_summary(build("resnet50", 1000), 224).startswith(
        "ResNet: 25.56M parameters (25.56M trainable), 4.09 GMACs per image at 224x224")
    assert "MACs not counted" in model_summary(build("timm/vit_tiny_patch16_224"), 33)  # not a multiple of 16
