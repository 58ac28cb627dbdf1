"""Knowledge distillation: a student learns from a frozen teacher's outputs as well as the labels.

The pieces a distillation objective puts together (Hinton et al. 2015; DeiT, Touvron et al. 2021):

- the losses: :func:`soft_distill_loss` (KL divergence of temperature-softened outputs) or
  :func:`hard_distill_loss` (cross-entropy on the teacher's top-1), mixed with the label loss by
  :func:`combine` as ``(1 - alpha) x label + alpha x distillation``;
- padding: rows whose label is -1 (a batch the stream could not fill) count for nothing in either
  loss; :func:`valid_rows` tells them from int labels or from MixUp/CutMix soft targets;
- DeiT's distillation token: :func:`enable_distilled_training` makes a timm ``deit_*_distilled_*``
  student return its two heads in training, :func:`split_heads` takes them apart (the class head
  learns from the labels, the distillation head from the teacher);
- the teacher: :func:`load_teacher` builds it frozen (eval mode, no gradients) from a distrain run
  directory or a weights file; :class:`TeacherView` feeds it the student's batch re-normalised
  (:func:`renormalize`) and resized (:func:`resize_for_teacher`) to what it was trained on;
  :func:`teacher_fingerprint` identifies its weights for resume checks; :func:`agreement_hits`
  counts where student and teacher agree at eval.

The teacher sees exactly the batch the student sees, after random erasing and MixUp/CutMix: its
outputs are targets for the image the student is given ("consistent" teaching, Beyer et al. 2022),
so distillation composes with every augmentation.

Every loss here is computed in float32, whatever the dtype of the logits (bf16 under DeepSpeed).
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from distrain.config import ModelConfig, from_dict
from distrain.errors import DistrainError
from distrain.models.factory import create_model
from distrain.models.pretrained import MODEL_FILE, classifier_names, load_pretrained, read_weights

KEY = "distill.teacher"
_HASH_CHUNK = 1 << 20
# load_pretrained's advice for a file that does not fit, and a teacher's (never partly loaded).
_PRETRAINED_HINT = re.compile(r"; skip tensors on purpose .*$")
_TEACHER_HINT = "; is the teacher's model (distill.teacher_model/teacher_kwargs, or its run's config) the right one?"
# ``model.pretrained`` (not ``model.pretrained_ignore``) in load_pretrained's errors: the teacher's key instead.
_PRETRAINED_KEY = re.compile(r"\bmodel\.pretrained\b")
# The model keys in create_model's errors, for a teacher named by distill.teacher_model/teacher_kwargs.
_MODEL_KEYS = re.compile(r"\bmodel\.(name|kwargs)\b")
_TEACHER_KEYS = {"name": "distill.teacher_model", "kwargs": "distill.teacher_kwargs"}


# --- losses ---------------------------------------------------------------------------------------


def valid_rows(targets: torch.Tensor) -> torch.Tensor:
    """Which rows of a micro-batch are real samples: label >= 0, or soft targets with mass (MixUp/CutMix
    gives a label -1 row an all-zero target).

    Args:
        targets: (B,) int labels or (B, C) probability targets.

    Returns:
        (B,) bool.
    """
    return targets >= 0 if targets.dim() == 1 else targets.sum(1) > 0


def _mean_over(per_row: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the rows of ``mask``; 0 (not NaN) when there are none, like the label losses.

    Multiplying by the mask rather than indexing with it avoids a device-to-host synchronisation.
    """
    if mask is None:
        return per_row.mean()
    weight = mask.to(per_row.dtype)
    return (per_row * weight).sum() / weight.sum().clamp_min(1)


def soft_distill_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``KL(softmax(t / T) || softmax(s / T)) x T^2``, summed over classes and averaged over samples.

    The reduction is KL's "batchmean": the per-sample divergence (a sum over the classes) averaged over
    the real samples, as the label cross-entropy is. The ``T^2`` keeps the gradient's scale about
    independent of ``T`` (Hinton et al. 2015): the gradient with respect to the student's logits is
    ``T x (softmax(s / T) - softmax(t / T)) / B``. So ``alpha`` in :func:`combine` weighs two losses
    of the same kind and means what it says.

    DeiT's ``DistillationLoss`` divides the summed KL by ``s.numel()`` = batch x classes instead:
    its value is this one divided by the number of classes (1000 on ImageNet), so its ``alpha`` gives
    the soft term a weight C times smaller than the same ``alpha`` does here.

    Args:
        student_logits: (B, C) logits, any float dtype.
        teacher_logits: (B, C) logits of the same images; treated as constants (detached).
        temperature: ``T`` > 0; 1 compares the plain softmax outputs.
        mask: (B,) bool, the rows to count (see :func:`valid_rows`); None counts every row.

    Returns:
        The scalar loss in float32 (0 when ``mask`` keeps no row).
    """
    s = F.log_softmax(student_logits.float() / temperature, dim=1)
    t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=1)
    per_row = F.kl_div(s, t, reduction="none", log_target=True).sum(1)
    return _mean_over(per_row, mask) * (temperature * temperature)


def hard_distill_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, label_smoothing: float = 0.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy of the student on the teacher's top-1 class (DeiT's hard distillation).

    Under MixUp/CutMix the teacher sees the mixed image, so the hard target is the teacher's top-1
    for that mixed image, a single class, where the label loss has the mixed soft target: the
    student is taught what the teacher makes of the image it is actually given ("consistent"
    teaching, Beyer et al. 2022), as DeiT does.

    Args:
        student_logits: (B, C) logits, any float dtype.
        teacher_logits: (B, C) logits of the same images (only their argmax is used).
        label_smoothing: Smoothing of the teacher's one-hot target (DeiT uses none).
        mask: (B,) bool, the rows to count (see :func:`valid_rows`); None counts every row.

    Returns:
        The scalar loss in float32, averaged over the counted rows (0 when there are none).
    """
    per_row = F.cross_entropy(student_logits.float(), teacher_logits.argmax(dim=1), reduction="none",
                              label_smoothing=label_smoothing)
    return _mean_over(per_row, mask)


def combine(label_loss: torch.Tensor, distill_loss: torch.Tensor, alpha: float) -> torch.Tensor:
    """``(1 - alpha) x label_loss + alpha x distill_loss``.

    ``alpha = 0`` returns ``label_loss`` itself: bit for bit the plain run's loss (no rounding, no
    dtype promotion, and a non-finite distillation term cannot leak in through ``0 x inf``).

    Args:
        alpha: Weight of the distillation term, in [0, 1].
    """
    if alpha == 0:
        return label_loss
    return (1.0 - alpha) * label_loss + alpha * distill_loss


# --- DeiT's distillation token --------------------------------------------------------------------


def enable_distilled_training(model: nn.Module) -> bool:
    """Make a timm distilled DeiT return ``(class logits, distillation logits)`` in training mode.

    In eval mode such a model keeps returning the average of its two heads, which is what DeiT
    evaluates. Call it on the unwrapped model, before ``accelerator.prepare``.

    Returns:
        Whether the model has a distillation head (timm's ``set_distilled_training``) and it was enabled.
    """
    setter = getattr(model, "set_distilled_training", None)
    if not callable(setter):
        return False
    setter(True)
    return True


def split_heads(output: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits for the label loss and those for the distillation loss.

    Args:
        output: A model's forward output: one logits tensor (both losses use it), or the pair
            ``(class head, distillation head)`` of a distilled DeiT in distilled training.

    Raises:
        TypeError: any other output.
    """
    if isinstance(output, torch.Tensor):
        return output, output
    if isinstance(output, (tuple, list)) and len(output) == 2 and all(isinstance(o, torch.Tensor) for o in output):
        return output[0], output[1]
    raise TypeError(f"expected logits or a (class, distillation) pair of logits, got {type(output).__name__}")


def agreement_hits(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """How many real samples (label >= 0) the student and the teacher give the same top-1 class.

    Returns:
        A float32 scalar on the logits' device (a sum, to all-reduce with the eval's other sums).
    """
    same = student_logits.argmax(dim=1) == teacher_logits.argmax(dim=1)
    return (same & (labels >= 0)).sum().float()


# --- the teacher's inputs -------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _affine(student_mean: tuple[float, ...], student_std: tuple[float, ...], teacher_mean: tuple[float, ...],
            teacher_std: tuple[float, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and shift, (1, 3, 1, 1) float32 on ``device``, made once: a host-to-device copy per
    micro-batch would stall the host."""
    scale = [s / t for s, t in zip(student_std, teacher_std)]
    shift = [(sm - tm) / t for sm, tm, t in zip(student_mean, teacher_mean, teacher_std)]
    return (torch.tensor(scale, device=device).view(1, -1, 1, 1),
            torch.tensor(shift, device=device).view(1, -1, 1, 1))


def renormalize(images: torch.Tensor, student_mean: Sequence[float], student_std: Sequence[float],
                teacher_mean: Sequence[float], teacher_std: Sequence[float]) -> torch.Tensor:
    """Images normalised with the student's mean/std, normalised with the teacher's instead.

    ``(x x s_std + s_mean - t_mean) / t_std`` per channel, computed in float32 and returned in the
    images' dtype.

    Returns:
        ``images`` itself when both normalisations are the same.
    """
    student = tuple(map(float, student_mean)), tuple(map(float, student_std))
    teacher = tuple(map(float, teacher_mean)), tuple(map(float, teacher_std))
    if student == teacher:
        return images
    scale, shift = _affine(*student, *teacher, images.device)
    return (images.float() * scale + shift).to(images.dtype)


def resize_for_teacher(images: torch.Tensor, size: int) -> torch.Tensor:
    """Images resized to ``size`` x ``size`` for a teacher trained at another resolution.

    Bilinear without antialiasing (``F.interpolate``'s default): the antialiased kernel has no
    bf16/fp16 version on the CPU, and it only changes the result when shrinking, while a teacher
    usually runs at a higher resolution than its student.

    Args:
        size: The teacher's input side; 0 keeps the images' own.

    Returns:
        ``images`` itself when they already have that size (or ``size`` is 0).
    """
    if not size or tuple(images.shape[-2:]) == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=False)


class TeacherView(nn.Module):
    """The frozen teacher as it must see the student's batch: re-normalised, resized, without gradients.

    It stays in eval mode whatever ``train()`` says, so an evaluation loop that restores training
    mode afterwards (:func:`distrain.engine.evaluate.evaluate`) leaves it frozen; the images are cast
    to the teacher's dtype. Keep it outside the student: never a submodule of what is handed to
    ``accelerator.prepare`` (DDP would sync it, DeepSpeed would train it).

    Args:
        teacher: The loaded teacher (:func:`load_teacher`).
        student_mean, student_std: How the student's images are normalised (``data.mean/std``).
        teacher_mean, teacher_std: How the teacher's were; empty: as the student's.
        resolution: The teacher's input side; 0: the student's.
    """

    def __init__(self, teacher: nn.Module, student_mean: Sequence[float], student_std: Sequence[float],
                 teacher_mean: Sequence[float] = (), teacher_std: Sequence[float] = (), resolution: int = 0):
        super().__init__()
        self.teacher = teacher.eval()
        self.normalisations = (list(student_mean), list(student_std), list(teacher_mean or student_mean),
                               list(teacher_std or student_std))
        self.resolution = resolution

    def train(self, mode: bool = True) -> TeacherView:
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = resize_for_teacher(renormalize(images, *self.normalisations), self.resolution)
        return self.teacher(images.to(next(self.teacher.parameters()).dtype))


# --- loading the teacher --------------------------------------------------------------------------


def check_distill(kind: str, alpha: float, temperature: float, teacher_mean: Sequence[float],
                  teacher_std: Sequence[float], teacher_resolution: int) -> None:
    """Refuse ``distill.*`` values that could not mean what they say (no file is read).

    Raises:
        DistrainError: naming the key.
    """
    if kind not in ("soft", "hard"):
        raise DistrainError(f"distill.kind: soft or hard, got {kind!r}")
    if not 0.0 <= alpha <= 1.0:
        raise DistrainError(f"distill.alpha: the weight of the distillation loss, in [0, 1], got {alpha}")
    if temperature <= 0:
        raise DistrainError(f"distill.temperature: must be > 0, got {temperature}")
    for key, vec in (("distill.teacher_mean", teacher_mean), ("distill.teacher_std", teacher_std)):
        if vec and len(vec) != 3:
            raise DistrainError(f"{key}: expected 3 values (RGB), or none for data's, got {list(vec)}")
    if teacher_std and min(teacher_std) <= 0:
        raise DistrainError(f"distill.teacher_std: every value must be > 0, got {list(teacher_std)}")
    if teacher_resolution < 0:
        raise DistrainError(f"distill.teacher_resolution: must be >= 0 (0: the student's), got {teacher_resolution}")


def teacher_model_config(teacher: str, teacher_model: str = "", teacher_kwargs: dict[str, Any] | None = None
                         ) -> ModelConfig:
    """The teacher's ``model`` section: ``teacher_model``/``teacher_kwargs`` when given, else the one in
    the config.yaml of the run that ``teacher`` names (a run directory or one of its checkpoints).

    Validated as ``model.*`` is (the architecture is built on the meta device); no weights are read.

    Raises:
        DistrainError: naming ``distill.teacher`` (no such path, no readable model section) or
            ``distill.teacher_model``/``distill.teacher_kwargs`` (a model that cannot be built).
    """
    path = Path(teacher).expanduser()
    if not path.exists():
        raise DistrainError(f"{KEY}: no such file or directory {teacher}")
    if teacher_model:
        try:
            return from_dict({"model": {"name": teacher_model, "kwargs": dict(teacher_kwargs or {})}}).model
        except DistrainError as e:
            message = _MODEL_KEYS.sub(lambda m: _TEACHER_KEYS[m.group(1)], str(e))
            raise DistrainError(_PRETRAINED_KEY.sub(KEY, message)) from None
    if teacher_kwargs:
        raise DistrainError("distill.teacher_kwargs: needs distill.teacher_model (a run's config names its own)")
    if path.is_file():
        raise DistrainError(f"{KEY}: {path} is a weights file; name the teacher's model with distill.teacher_model "
                            "(and distill.teacher_kwargs)")
    return _run_model_config(path)


def _run_model_config(run: Path) -> ModelConfig:
    # A checkpoint (RUN_DIR/checkpoints/update-N) has its run's config two levels up.
    candidates = [run / "config.yaml"]
    if run.parent.name == "checkpoints":
        candidates.append(run.parent.parent / "config.yaml")
    config = next((c for c in candidates if c.is_file()), None)
    if config is None:
        raise DistrainError(f"{KEY}: {run} has no config.yaml (not a distrain run or checkpoint directory); name "
                            "the teacher's model with distill.teacher_model (and distill.teacher_kwargs)")

    def unreadable(why: str) -> DistrainError:
        return DistrainError(f"{KEY}: cannot read the teacher's model from {config} ({why.splitlines()[0][:200]}); "
                             "name it with distill.teacher_model (and distill.teacher_kwargs)")

    try:
        data = yaml.safe_load(config.read_text())
    except OSError as e:
        raise unreadable(e.strerror or type(e).__name__) from None
    except yaml.YAMLError as e:
        raise unreadable(f"not valid YAML: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise unreadable("no model section")
    if data.get("phases"):
        raise DistrainError(f"{KEY}: {run} is a recipe of phases; point it at the directory of the phase that "
                            f"trained the teacher, {run}/<phase name>")
    try:
        return from_dict({"model": data["model"]}).model
    except DistrainError as e:
        raise unreadable(str(e)) from None


def load_teacher(teacher: str, num_classes: int, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, teacher_model: str = "",
                 teacher_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """The frozen teacher: built as :func:`teacher_model_config` says, all of its weights loaded, in eval
    mode, without gradients, on ``device`` in ``dtype``.

    Loading is strict: every tensor of the model must come from the file with its shape, the
    classifier's included (a teacher with another number of classes is refused, never
    re-initialised). Built under a forked RNG, so the global torch RNG, and with it the student's
    init and everything drawn later, is the same as in a run without a teacher.

    Args:
        teacher: ``distill.teacher``: a distrain run directory, one of its checkpoints, a
            ``.safetensors`` file or a ``torch.save`` state dict (see
            :func:`distrain.models.pretrained.read_weights`; a file needs ``teacher_model``).
        num_classes: The data's classes.
        device: Where it runs; None leaves it on the CPU.
        dtype: Its parameters' and buffers' float dtype (the run's precision); None keeps float32.
        teacher_model, teacher_kwargs: ``distill.teacher_model``/``teacher_kwargs``.

    Raises:
        DistrainError: naming the ``distill.*`` key: see :func:`teacher_model_config`; weights that
            cannot be read or do not fit the model; another number of classes.
    """
    mcfg = teacher_model_config(teacher, teacher_model, teacher_kwargs)
    with torch.random.fork_rng(devices=[]):
        model = create_model(mcfg, num_classes)
    try:
        report = load_pretrained(model, teacher)
    except DistrainError as e:
        raise DistrainError(_PRETRAINED_HINT.sub(_TEACHER_HINT, _PRETRAINED_KEY.sub(KEY, str(e)))) from None
    if report.reinitialised:  # load_pretrained leaves a classifier of another shape at its init
        raise DistrainError(f"{KEY}: the teacher has {_file_classes(report.path, model)} classes, the data "
                            f"{num_classes}")
    model.eval().requires_grad_(False)
    return model.to(device=device, dtype=dtype)


def _file_classes(path: Path, model: nn.Module) -> int:
    """Outputs of the classifier stored in the weights at ``path`` (read again: an error path only)."""
    _, weights = read_weights(str(path))
    head = classifier_names(model)[0]
    # Keys may carry the DDP/torch.compile prefixes that load_pretrained strips.
    return next(v.shape[0] for k, v in weights.items() if k == head or k.endswith("." + head))


def teacher_fingerprint(teacher: str) -> str:
    """The sha256 of the teacher's weights, streamed (checked on resume; the weights are not checkpointed).

    Args:
        teacher: As for :func:`load_teacher`. A directory is hashed through the file its weights
            come from (``model.safetensors``, or Accelerate's ``pytorch_model.bin``), or, for a
            DeepSpeed checkpoint, every file of its ``pytorch_model*`` folders with their names.

    Raises:
        DistrainError: naming ``distill.teacher``: no such path, or a directory without weights.
    """
    path = Path(teacher).expanduser()
    if not path.exists():
        raise DistrainError(f"{KEY}: no such file or directory {teacher}")
    if path.is_file():
        files = [path]
    elif (path / MODEL_FILE).is_file() or (path / "pytorch_model.bin").is_file():
        files = [path / MODEL_FILE if (path / MODEL_FILE).is_file() else path / "pytorch_model.bin"]
    else:
        files = sorted(f for d in path.glob("pytorch_model*") if d.is_dir() for f in d.rglob("*") if f.is_file())
        if not files:
            raise DistrainError(f"{KEY}: {path} holds no model weights ({MODEL_FILE}, or a distrain checkpoint's)")
    digest = hashlib.sha256()
    for f in files:
        if len(files) > 1:  # a file renamed or moved between partitions is another checkpoint
            digest.update(str(f.relative_to(path)).encode() + b"\0")
        with f.open("rb") as stream:
            while chunk := stream.read(_HASH_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()
