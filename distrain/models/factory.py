"""Create a classification model from ``model.*``, check that config before any process starts, summarise it.

Names: a CIFAR ResNet (``cifar_resnet20`` ... ``cifar_resnet110``), a torchvision classification
model (``resnet50``, ``vit_b_16``, ...) or a timm model (``timm/vit_small_patch16_224``); nothing is
ever downloaded. How each ``model.*`` option reaches each kind of model:

- ``kwargs``: to the builder (CIFAR ResNets take none). One that a distrain option also sets is
  refused when both are set.
- ``norm``: see :mod:`distrain.models.norms`. ``batch`` is the model's own norm layers (LayerNorm
  for transformers); ``group``/``layer``/``instance`` need a ResNet that takes a norm layer (CIFAR,
  torchvision ``resnet*``/``resnext*``/``wide_resnet*``, timm's ResNet family).
- ``zero_init_residual``: CIFAR and torchvision ResNets; timm's ``zero_init_last`` (which timm's
  ResNets already default to).
- ``drop_path_rate``: CIFAR and torchvision ResNets get a drop path on each residual branch;
  torchvision's ConvNeXt, EfficientNet, Swin and MaxViT have their own, whose rates are reset;
  timm models take their ``drop_path_rate`` (timm's own per-model rule). Linear by depth in the
  first two cases (:mod:`distrain.models.stochastic_depth`). Other models are refused.
- ``dropout``: timm's ``drop_rate``; torchvision's ``dropout`` where it is a classifier dropout
  (AlexNet, VGG, EfficientNet, MobileNets, MNASNet, SqueezeNet, GoogLeNet, Inception v3); on the
  input of the final linear layer otherwise (ResNets, RegNet, ShuffleNet, DenseNet, ConvNeXt, ViT,
  Swin, MaxViT: torchvision's ViT/Swin ``dropout`` is an encoder dropout, still reachable through
  ``model.kwargs.dropout``).

``drop_path_rate: 0`` and ``dropout: 0`` leave a model as its builder makes it: torchvision's
ConvNeXt, EfficientNet, Swin and MaxViT keep their default stochastic depth, and its classifier
dropouts their default rates (``model.kwargs`` changes those where the builder takes them).

torchvision's GoogLeNet and Inception v3 are built without their auxiliary heads (their training
output is then the logits alone). timm's distilled DeiTs return the average of their two heads
(distillation training is not wired here).
"""

from __future__ import annotations

import difflib
import functools
import re
from collections.abc import Callable
from typing import Any

import torch
import torchvision
from torch import nn

from distrain.config import ModelConfig
from distrain.errors import DistrainError
from distrain.models.cifar_resnet import CifarResNet
from distrain.models.norms import NORM_LAYER_BUILDERS, convert_norm, describe_norms
from distrain.models.stochastic_depth import add_input_dropout, add_resnet_drop_path, set_drop_path_rates

TIMM_PREFIX = "timm/"
_CIFAR_DEPTHS = {f"cifar_resnet{d}": d for d in (20, 32, 44, 56, 110)}

# torchvision families, by name prefix.
_TV_RESNETS = ("resnet", "resnext", "wide_resnet")
# Builders whose own ``dropout`` drops features in front of (or inside) the classifier.
_TV_OWN_DROPOUT = ("alexnet", "vgg", "efficientnet", "mobilenet", "mnasnet", "squeezenet", "googlenet", "inception")
# The final linear layer of the others, whose input model.dropout drops.
_TV_CLASSIFIER = {"resnet": "fc", "resnext": "fc", "wide_resnet": "fc", "regnet": "fc", "shufflenet": "fc",
                  "densenet": "classifier", "convnext": "classifier.2", "vit": "heads.head", "swin": "head",
                  "maxvit": "classifier.5"}
# Families built with torchvision.ops.StochasticDepth layers of their own.
_TV_OWN_DROP_PATH = ("convnext", "efficientnet", "swin", "maxvit")
# Defaults distrain gives torchvision builders (model.kwargs may override): a single logits output,
# and the weight init torchvision otherwise warns it will change.
_TV_DEFAULTS = {"googlenet": {"aux_logits": False, "init_weights": True},
                "inception": {"aux_logits": False, "init_weights": True}}

# Builder arguments that pick or load weights: distrain never downloads (model.pretrained loads files).
_WEIGHT_KWARGS = ("pretrained", "weights", "checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")
_UNEXPECTED = re.compile(r"unexpected keyword argument(?:\(s\))?:? \[?'(\w+)'")
_MULTIPLE = re.compile(r"multiple values for (?:keyword )?argument '(\w+)'")
# Classes of the model that check_model builds (the number does not change what is valid).
_CHECK_CLASSES = 10
# check_model's keys of the model configs that passed.
_PASSED: set[str] = set()


@functools.cache
def _torchvision_names() -> frozenset[str]:
    return frozenset(torchvision.models.list_models(module=torchvision.models))


@functools.cache
def _timm_names() -> frozenset[str]:
    import timm

    return frozenset(timm.list_models())


def model_names() -> list[str]:
    """Every name :func:`create_model` accepts (timm's with the ``timm/`` prefix; imports timm)."""
    return sorted(_CIFAR_DEPTHS) + sorted(_torchvision_names()) + sorted(TIMM_PREFIX + n for n in _timm_names())


def check_model_name(name: str) -> None:
    """Raise DistrainError naming ``model.name`` (and the closest known names) for an unknown model.

    timm is imported only for ``timm/`` names and to suggest names for an unknown one.
    """
    if name in _CIFAR_DEPTHS or name in _torchvision_names():
        return
    # A pretrained tag (timm/resnet50.a1_in1k) picks weights, not the architecture.
    if name.startswith(TIMM_PREFIX) and name[len(TIMM_PREFIX):].split(".")[0] in _timm_names():
        return
    close = difflib.get_close_matches(name, model_names(), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise DistrainError(f"model.name: unknown model {name!r}{hint}")


def create_model(mcfg: ModelConfig, num_classes: int) -> nn.Module:
    """A randomly initialised classifier as ``model.*`` describes it (weights and init are loaded elsewhere).

    Applies ``name``, ``kwargs``, ``norm`` (with ``ghost_batch_size``), ``zero_init_residual``,
    ``drop_path_rate`` and ``dropout``; see the module docstring for how each reaches each model.

    Args:
        mcfg: The ``model`` section of the config.
        num_classes: Size of the output layer.

    Raises:
        DistrainError: naming the ``model.*`` key at fault: unknown name, an argument the model does
            not take, an option it cannot apply, or a builder failure.
    """
    _check_options(mcfg)
    if mcfg.name in _CIFAR_DEPTHS:
        model = _create_cifar(mcfg, num_classes)
    elif mcfg.name.startswith(TIMM_PREFIX):
        model = _create_timm(mcfg, num_classes)
    else:
        model = _create_torchvision(mcfg, num_classes)
    if mcfg.cifar_stem:
        _cifar_stem(model, mcfg.name)
    return convert_norm(model, mcfg.norm, mcfg.ghost_batch_size, mcfg.name, mcfg.name.startswith(TIMM_PREFIX))


def _cifar_stem(model: nn.Module, name: str) -> None:
    """Give a ResNet the 3x3 stride-1 stem without max-pool of the CIFAR variants (``model.cifar_stem``)."""
    conv = getattr(model, "conv1", None)
    if not isinstance(conv, nn.Conv2d) or not isinstance(getattr(model, "maxpool", None), nn.Module):
        raise DistrainError(f"model.cifar_stem: {name} has no ResNet stem (conv1 + maxpool) to replace")
    model.conv1 = nn.Conv2d(conv.in_channels, conv.out_channels, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()


def check_model(mcfg: ModelConfig) -> None:
    """Validate ``model.*`` without building real weights: call it during config validation.

    Builds the model on the meta device (:func:`create_meta_model`) through the same code as
    :func:`create_model`, so every refusal of create_model appears here; then runs a batch of 2
    through it in training mode, on the meta device, and requires a ``(batch, classes)`` logits
    tensor. A forward the meta device cannot run is skipped (the real run will tell). A timm name
    imports timm (seconds, once). A config that passed is remembered for the rest of the process.

    Raises:
        DistrainError: naming the ``model.*`` key at fault.
    """
    # Configs are validated again and again in one process (phases, resumes, tests): a model that
    # passed once passes again.
    key = repr((mcfg.name, mcfg.kwargs, mcfg.norm, mcfg.ghost_batch_size, mcfg.zero_init_residual,
                mcfg.drop_path_rate, mcfg.dropout, mcfg.cifar_stem))
    if key not in _PASSED:
        _check_model(mcfg)
        _PASSED.add(key)


def create_meta_model(mcfg: ModelConfig, num_classes: int) -> nn.Module:
    """:func:`create_model` with every parameter and buffer on the meta device: names and shapes only.

    No memory, no init work, the global RNG untouched; timm is imported outside the device context
    (a first import under ``torch.device("meta")`` would leave its module-level tensors there).

    Raises:
        DistrainError: as :func:`create_model`.
    """
    from accelerate import init_empty_weights

    _check_options(mcfg)
    # Most builders run entirely on the meta device. Some compute layer widths from tensor values
    # (torchvision's RegNet), which needs only the parameters on meta; others do arithmetic between
    # their parameters and fresh tensors (timm's SwinV2), which needs everything there. A builder
    # that fails both builds for real, so the failure reported is never an artefact of meta.
    for place in (lambda: torch.device("meta"), lambda: init_empty_weights(include_buffers=False)):
        try:
            with torch.random.fork_rng(devices=[]), place():
                return create_model(mcfg, num_classes).to("meta")
        except _BuildFailure:
            continue
    with torch.random.fork_rng(devices=[]):
        return create_model(mcfg, num_classes).to("meta")


def _check_model(mcfg: ModelConfig) -> None:
    model = create_meta_model(mcfg, _CHECK_CLASSES)
    size = _probe_size(model, mcfg)
    try:
        with torch.no_grad():
            out = model.train()(torch.empty(2, 3, *size, device="meta"))
    except Exception:  # noqa: BLE001 - the meta device cannot run every model; the real forward will tell
        return
    given = " with model.kwargs" if mcfg.kwargs else ""
    if not isinstance(out, torch.Tensor):
        raise DistrainError(
            f"model.name: {mcfg.name}{given} returns a {type(out).__name__} in training mode; distrain trains on a "
            "single logits tensor"
        )
    if tuple(out.shape) != (2, _CHECK_CLASSES):
        raise DistrainError(
            f"model.name: {mcfg.name}{given} returns shape {tuple(out.shape)} for 2 images and {_CHECK_CLASSES} "
            f"classes; distrain needs (batch, classes) logits"
        )


def model_summary(model: nn.Module, resolution: int, name: str | None = None) -> str:
    """One line: parameters, trainable parameters and multiply-accumulates per image.

    MACs (one per fused multiply-add, the fvcore/timm "GMACs" convention; FLOPs are about twice as
    many) of the convolutions and matrix products of one eval-mode forward of a single
    ``resolution`` x ``resolution`` image, counted by :class:`torch.utils.flop_counter.FlopCounterMode`
    on meta-device copies of the parameters: no compute, and the model's weights, buffers (BN
    statistics) and train/eval modes are left as they were.

    Args:
        model: The unwrapped model (before DDP/compile).
        resolution: Side of the square input image.
        name: Label of the line; the model's class name by default.
    """
    from torch.utils.flop_counter import FlopCounterMode

    label = name or type(model).__name__
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    line = f"{label}: {total / 1e6:.2f}M parameters ({trainable / 1e6:.2f}M trainable)"
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    state = {k: torch.empty_like(v, device="meta") for k, v in tensors.items()}
    modes = {m: m.training for m in model.modules()}
    counter = FlopCounterMode(display=False)
    try:
        model.eval()
        with torch.no_grad(), counter:
            torch.func.functional_call(model, state, (torch.empty(1, 3, resolution, resolution, device="meta"),))
    except Exception as e:  # noqa: BLE001 - a summary must not stop a run
        return f"{line}; MACs not counted at {resolution}x{resolution} ({type(e).__name__})"
    finally:
        for m, training in modes.items():
            m.training = training
    return f"{line}, {counter.get_total_flops() / 2e9:.3g} GMACs per image at {resolution}x{resolution}"


def _check_options(mcfg: ModelConfig) -> None:
    check_model_name(mcfg.name)
    if (mcfg.norm == "ghost") != (mcfg.ghost_batch_size > 0):
        raise DistrainError(
            f"model.ghost_batch_size: {mcfg.ghost_batch_size} with model.norm={mcfg.norm}; ghost BN is "
            "model.norm=ghost with model.ghost_batch_size > 0"
        )
    for key, p in (("model.drop_path_rate", mcfg.drop_path_rate), ("model.dropout", mcfg.dropout)):
        if not 0.0 <= p < 1.0:
            raise DistrainError(f"{key}: a probability in [0, 1), got {p}")
    for key in mcfg.kwargs:
        if key in _WEIGHT_KWARGS:
            raise DistrainError(
                f"model.kwargs.{key}: distrain never downloads weights; load a file with model.pretrained"
            )
        if key == "num_classes":
            raise DistrainError("model.kwargs.num_classes: set by data.num_classes (or the shard index)")


def _create_cifar(mcfg: ModelConfig, num_classes: int) -> nn.Module:
    if mcfg.kwargs:
        key = next(iter(mcfg.kwargs))
        raise DistrainError(f"model.kwargs.{key}: {mcfg.name} takes no argument {key!r}")
    norm_layer = NORM_LAYER_BUILDERS.get(mcfg.norm, nn.BatchNorm2d)
    return CifarResNet(_CIFAR_DEPTHS[mcfg.name], num_classes, norm_layer, mcfg.zero_init_residual,
                       mcfg.drop_path_rate, mcfg.dropout)


def _tv_family(name: str) -> str:
    return next((f for f in (*_TV_CLASSIFIER, *_TV_OWN_DROPOUT) if name.startswith(f)), name)


def _create_torchvision(mcfg: ModelConfig, num_classes: int) -> nn.Module:
    name, family = mcfg.name, _tv_family(mcfg.name)
    resnet = family in _TV_RESNETS
    owned: dict[str, tuple[Any, str]] = {}
    if mcfg.norm in NORM_LAYER_BUILDERS and resnet:
        owned["norm_layer"] = (NORM_LAYER_BUILDERS[mcfg.norm], "model.norm")
    if mcfg.zero_init_residual:
        if not resnet:
            raise DistrainError(f"model.zero_init_residual: {name} is not a ResNet")
        owned["zero_init_residual"] = (True, "model.zero_init_residual")
    if mcfg.dropout and family in _TV_OWN_DROPOUT:
        owned["dropout"] = (mcfg.dropout, "model.dropout")
    if mcfg.drop_path_rate and not (resnet or family in _TV_OWN_DROP_PATH):
        raise DistrainError(
            f"model.drop_path_rate: {name} has no residual branches distrain can drop (torchvision: ResNets, "
            "ConvNeXt, EfficientNet, Swin, MaxViT; or a timm model)"
        )
    builder = functools.partial(torchvision.models.get_model, name, weights=None, num_classes=num_classes)
    model = _instantiate(builder, mcfg, owned, _TV_DEFAULTS.get(family, {}))
    if mcfg.norm in NORM_LAYER_BUILDERS and not resnet:
        raise _keeps_own_norms(model, mcfg)
    if mcfg.drop_path_rate:
        if resnet:
            add_resnet_drop_path(model, mcfg.drop_path_rate)
        else:
            set_drop_path_rates(model, mcfg.drop_path_rate)
    if mcfg.dropout and family not in _TV_OWN_DROPOUT:
        add_input_dropout(model.get_submodule(_TV_CLASSIFIER[family]), mcfg.dropout)
    return model


def _create_timm(mcfg: ModelConfig, num_classes: int) -> nn.Module:
    import timm
    from timm.layers import DropPath
    from timm.models import is_model_in_modules

    name = mcfg.name[len(TIMM_PREFIX):]
    swap_norm = mcfg.norm in NORM_LAYER_BUILDERS and is_model_in_modules(name.split(".")[0], ["resnet"])
    owned: dict[str, tuple[Any, str]] = {}
    if swap_norm:
        owned["norm_layer"] = (NORM_LAYER_BUILDERS[mcfg.norm], "model.norm")
    if mcfg.zero_init_residual:
        owned["zero_init_last"] = (True, "model.zero_init_residual")
    if mcfg.drop_path_rate:
        owned["drop_path_rate"] = (mcfg.drop_path_rate, "model.drop_path_rate")
    if mcfg.dropout:
        owned["drop_rate"] = (mcfg.dropout, "model.dropout")
    builder = functools.partial(timm.create_model, name, pretrained=False, num_classes=num_classes)
    model = _instantiate(builder, mcfg, owned, {})
    if mcfg.norm in NORM_LAYER_BUILDERS and not swap_norm:
        raise _keeps_own_norms(model, mcfg)
    # A builder may accept drop_path_rate through **kwargs and ignore it.
    if mcfg.drop_path_rate and not any(isinstance(m, DropPath) and m.drop_prob > 0 for m in model.modules()):
        raise DistrainError(f"model.drop_path_rate: {mcfg.name} takes the argument but builds no drop-path layers")
    return model


def _instantiate(builder: Callable[..., nn.Module], mcfg: ModelConfig, owned: dict[str, tuple[Any, str]],
                 defaults: dict[str, Any]) -> nn.Module:
    """Call ``builder`` with ``defaults``, ``model.kwargs`` and the arguments distrain options set.

    Args:
        builder: The model's builder, its name and class count bound.
        mcfg: The ``model`` section.
        owned: Builder argument -> (value, the ``model.*`` key that sets it).
        defaults: Builder arguments that ``model.kwargs`` may override.

    Raises:
        DistrainError: a ``model.kwargs`` key that an option also sets, an argument the builder does
            not take (named by the key that passed it), or any other builder failure.
    """
    for arg, (value, key) in owned.items():
        if arg in mcfg.kwargs and mcfg.kwargs[arg] != value:
            raise DistrainError(f"model.kwargs.{arg}: {key} sets it; set one of them")
    kwargs = {**defaults, **mcfg.kwargs, **{arg: value for arg, (value, _) in owned.items()}}
    try:
        return builder(**kwargs)
    except TypeError as e:
        match = _UNEXPECTED.search(str(e)) or _MULTIPLE.search(str(e))
        arg = match and match.group(1)
        if arg in mcfg.kwargs:
            what = f"takes no argument {arg!r}" if match.re is _UNEXPECTED else f"sets {arg!r} itself"
            raise DistrainError(f"model.kwargs.{arg}: {mcfg.name} {what}") from e
        if arg in owned:
            raise DistrainError(f"{owned[arg][1]}: {mcfg.name} takes no {arg!r} argument") from e
        raise _build_failure(mcfg, e) from e
    except Exception as e:  # builders raise anything for bad arguments
        raise _build_failure(mcfg, e) from e


class _BuildFailure(DistrainError):
    """A builder raised something other than a refused argument."""


def _build_failure(mcfg: ModelConfig, e: Exception) -> _BuildFailure:
    key = f"model.kwargs {mcfg.kwargs}" if mcfg.kwargs else "model.name"
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return _BuildFailure(f"{key}: building {mcfg.name} failed: {type(e).__name__}: {first}")


def _keeps_own_norms(model: nn.Module, mcfg: ModelConfig) -> DistrainError:
    return DistrainError(
        f"model.norm: {mcfg.name} keeps its own norm layers ({describe_norms(model)}); model.norm={mcfg.norm} "
        "needs a ResNet that takes a norm layer (CIFAR, torchvision or timm ResNets); use model.norm=batch "
        "(the model's own)"
    )


def _probe_size(model: nn.Module, mcfg: ModelConfig) -> tuple[int, int]:
    """An input size the model accepts, for check_model's forward."""
    size = mcfg.kwargs.get("img_size") or mcfg.kwargs.get("image_size")
    if size is None and (mcfg.name in _CIFAR_DEPTHS or mcfg.cifar_stem):
        size = 32
    if size is None:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        size = tuple(cfg["input_size"][1:]) if "input_size" in cfg else 299 if mcfg.name == "inception_v3" else 224
    return (size, size) if isinstance(size, int) else tuple(size)
