"""Starting from pretrained weights (``model.pretrained``): a distrain run or checkpoint, or a file.

The load is strict except where the recipe says otherwise: the classifier is left at the model's
fresh init when its shape differs (another number of classes) or ``model.reset_classifier`` is set,
and tensors matching ``model.pretrained_ignore`` are skipped. Any other tensor missing from the
file, left over in it, or of another shape is an error listing them, so a backbone that silently
stayed random cannot pass for a fine-tuned one. BatchNorm statistics load with the weights.

Nothing is ever downloaded, and nothing in a file can run: ``.safetensors`` holds tensors only, and
every other file goes through :func:`distrain.track.safeload.refusing_pickled_code`.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from distrain.errors import DistrainError
from distrain.models.init import refuse_zero3_placeholders
from distrain.parallel.deepspeed import consolidated_state_dict
from distrain.track.checkpoint import checkpoint_dirs
from distrain.track.safeload import refusing_pickled_code

KEY = "model.pretrained"
MODEL_FILE = "model.safetensors"
# Where training scripts nest the weights (torchvision/timm references, Lightning-style, ours).
_NESTING = ("state_dict", "model", "model_state", "model_state_dict")
# Wrappers that prefix every key: DistributedDataParallel and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_SHOWN = 5


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did.

    Attributes:
        path: The file the weights were read from (or the DeepSpeed checkpoint directory).
        loaded: Tensors loaded (parameters and buffers).
        reinitialised: Classifier tensors that kept the model's fresh init.
        ignored: Tensor names (of the model or the file) skipped by ``model.pretrained_ignore``.
    """

    path: Path
    loaded: int
    reinitialised: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        parts = [f"{self.loaded} tensors from {self.path}"]
        if self.reinitialised:
            parts.append(f"classifier {', '.join(self.reinitialised)} re-initialised")
        if self.ignored:
            parts.append(f"{len(self.ignored)} ignored")
        return "pretrained: " + "; ".join(parts)


def classifier_names(model: nn.Module) -> list[str]:
    """Parameter names of ``model``'s classifier: timm's ``get_classifier()``, else the last ``nn.Linear``.

    Args:
        model: A classification model (unwrapped).

    Raises:
        DistrainError: the model has no such layer with parameters.
    """
    if hasattr(model, "get_classifier"):
        found = model.get_classifier()
        heads = found if isinstance(found, tuple) else [found]  # distilled DeiT: (head, head_dist)
    else:
        heads = [m for m in model.modules() if isinstance(m, nn.Linear)][-1:]
    wanted = {id(m) for m in heads}
    names = [f"{prefix}.{p}" if prefix else p
             for prefix, m in model.named_modules() if id(m) in wanted
             for p, _ in m.named_parameters(recurse=True)]
    if not names:
        raise DistrainError(f"model.name: cannot tell the classifier of {type(model).__name__} (no linear "
                            "head with parameters)")
    return names


def read_weights(source: str) -> tuple[Path, dict[str, torch.Tensor]]:
    """The weights ``source`` names, as a flat state dict on the CPU, and the path read.

    ``source`` is a run directory or a checkpoint directory holding ``model.safetensors`` (or
    Accelerate's ``pytorch_model.bin``), a DeepSpeed checkpoint (its ZeRO partitions merged, see
    :func:`distrain.parallel.deepspeed.consolidated_state_dict`), a ``.safetensors`` file, or any file
    that ``torch.save`` wrote (read weights-only). A state dict nested under ``state_dict``,
    ``model``, ``model_state`` or ``model_state_dict`` is taken out; the ``module.`` (DDP) and
    ``_orig_mod.`` (torch.compile) prefixes are left for :func:`load_pretrained` to strip.

    Raises:
        DistrainError: no such path, a directory without weights, a file that is not a state dict,
            or one that holds pickled code (refused, never run).
    """
    path = Path(source).expanduser()
    if not path.exists():
        raise DistrainError(
            f"{KEY}: no such file or directory {source} (distrain never downloads: fetch torchvision/timm "
            "weights on a machine with internet, e.g. torchvision.models.ResNet50_Weights.IMAGENET1K_V2"
            ".get_state_dict() saved with torch.save, and point model.pretrained at the file)"
        )
    if path.is_dir():
        return _read_dir(path)
    try:
        if path.suffix == ".safetensors":
            return path, load_file(path)
        with refusing_pickled_code(KEY):
            loaded = torch.load(path, map_location="cpu")
    except (SafetensorError, OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:
        why = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise DistrainError(f"{KEY}: cannot load {path} ({why})") from None
    return path, _unnest(loaded, path)


def _read_dir(path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    if (path / MODEL_FILE).is_file():  # a finished run's export, or a checkpoint saved without DeepSpeed
        return read_weights(str(path / MODEL_FILE))
    if (path / "pytorch_model.bin").is_file():  # Accelerate without safe serialisation
        return read_weights(str(path / "pytorch_model.bin"))
    if any(p.is_dir() and p.name.startswith("pytorch_model") for p in path.iterdir()):  # ZeRO partitions
        return path, consolidated_state_dict(path, KEY)
    newest = checkpoint_dirs(path)
    if newest:
        raise DistrainError(f"{KEY}: {path} has no {MODEL_FILE} (the run has not finished); point "
                            f"model.pretrained at one of its checkpoints, e.g. {newest[-1]}")
    raise DistrainError(f"{KEY}: {path} is a directory without model weights ({MODEL_FILE}, or a distrain "
                        "checkpoint's)")


def _unnest(loaded: object, path: Path) -> dict[str, torch.Tensor]:
    while isinstance(loaded, Mapping) and not _is_state_dict(loaded):
        key = next((k for k in _NESTING if isinstance(loaded.get(k), Mapping)), None)
        if key is None:
            break
        loaded = loaded[key]
    if not isinstance(loaded, Mapping) or not _is_state_dict(loaded):
        what = f"keys {_few(sorted(map(str, loaded)))}" if isinstance(loaded, Mapping) else type(loaded).__name__
        raise DistrainError(f"{KEY}: {path} holds no state dict (names to tensors, possibly under "
                            f"{'/'.join(_NESTING)}); found {what}")
    return dict(loaded)


def _is_state_dict(d: Mapping) -> bool:
    return bool(d) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items())


def _strip_wrappers(weights: dict[str, torch.Tensor], model_keys: list[str]) -> dict[str, torch.Tensor]:
    while True:
        prefix = next((p for p in _WRAPPER_PREFIXES if all(k.startswith(p) for k in weights)
                       and not all(k.startswith(p) for k in model_keys)), None)
        if prefix is None:
            return weights
        weights = {k[len(prefix):]: v for k, v in weights.items()}


def _few(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_SHOWN])
    return shown + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


def load_pretrained(
    model: nn.Module, source: str, ignore: Sequence[str] = (), reset_classifier: bool = False
) -> LoadReport:
    """Load the weights ``source`` names into ``model`` in place; call it before ``accelerator.prepare``.

    Call it after :func:`distrain.models.init.init_weights`: what is not loaded (the classifier
    when re-initialised, ignored tensors) keeps that init.

    Args:
        model: The plain model as built (not wrapped by DDP/DeepSpeed).
        source: ``model.pretrained``: see :func:`read_weights`.
        ignore: ``model.pretrained_ignore``: ``fnmatch`` globs of tensor names (of the model or the
            file) to skip; each must match something.
        reset_classifier: ``model.reset_classifier``: leave the classifier (see
            :func:`classifier_names`) at its init even when its shape matches.

    Returns:
        What was read, loaded, re-initialised and ignored.

    Raises:
        DistrainError: see :func:`read_weights`; a glob matching nothing; any tensor missing, left
            over or of another shape that neither the classifier rule nor ``ignore`` covers.
    """
    refuse_zero3_placeholders(model, KEY)
    target = model.state_dict()
    path, weights = read_weights(source)
    weights = _strip_wrappers(weights, list(target))
    every = [*target, *(k for k in weights if k not in target)]
    ignored = [k for k in every if any(fnmatchcase(k, g) for g in ignore)]
    unmatched = [g for g in ignore if not any(fnmatchcase(k, g) for k in every)]
    if unmatched:
        raise DistrainError(f"model.pretrained_ignore: {', '.join(map(repr, unmatched))} matches no tensor of "
                            f"the model or of {path}")
    skipped = set(ignored)
    reshaped = [k for k in target if k in weights and k not in skipped and weights[k].shape != target[k].shape]
    reinitialised = []
    if reset_classifier or reshaped:
        head = [k for k in classifier_names(model) if k not in skipped]
        if reset_classifier or any(k in reshaped for k in head):
            reinitialised = head
    skipped |= set(reinitialised)
    # torch fills a missing BN num_batches_tracked (state dicts from before PyTorch 0.4.1 lack it).
    missing = [k for k in target if k not in weights and k not in skipped and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in weights if k not in target and k not in skipped]
    wrong_shape = [f"{k} (file {list(weights[k].shape)} vs model {list(target[k].shape)})"
                   for k in reshaped if k not in skipped]
    if missing or unexpected or wrong_shape:
        problems = [f"{len(names)} {what} ({_few(names)})"
                    for what, names in (("missing in the file", missing), ("unexpected in the file", unexpected),
                                        ("of another shape", wrong_shape)) if names]
        raise DistrainError(f"{KEY}: {path} does not fit {type(model).__name__}: {'; '.join(problems)}; skip tensors "
                            "on purpose with model.pretrained_ignore (globs) or model.reset_classifier")
    chosen = {k: v for k, v in weights.items() if k not in skipped}
    model.load_state_dict(chosen, strict=False)
    return LoadReport(path, len(chosen), reinitialised, ignored)
