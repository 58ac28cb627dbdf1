"""The typed schema of a distrain run, YAML recipes with ``extends``, and dotted overrides.

A recipe is a YAML mapping whose keys mirror :class:`Config`. ``extends: other.yaml`` (a path
relative to the recipe) deep-merges the recipe over its base. Command-line overrides are
``section.key=value`` with the value parsed as YAML. Every key and value is checked against the
schema before any process group, model or dataset exists; a mistake raises :class:`DistrainError`
naming the key and, for a misspelt key, the closest valid one.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from distrain.errors import DistrainError


@dataclass
class DataConfig:
    """Where the shards are and how samples become uint8 tensors."""

    train: Union[str, list[str]] = ""
    """Training shards: a shard-set directory, a file, a glob or a brace pattern (or a list)."""
    eval: Union[str, list[str]] = ""
    """Evaluation shards, same forms as ``train``; empty disables evaluation."""
    prepare: Optional[Literal["digits"]] = None
    """Write this built-in dataset's shards when ``train`` is missing (the quickstart uses it)."""
    num_classes: int = 0
    """0 takes the number of classes from the shard index."""
    train_samples: int = 0
    """Size of the training set for ``distrain plan`` without data; 0 reads the shard index."""
    train_crop: int = 224
    """Training resolution (the random crop's output side); progressive resizing changes it per epoch."""
    train_resize: int = 0
    """0 trains on RandomResizedCrop; > 0 trains on test-time preprocessing instead (shorter side to
    this, centre crop ``train_crop``, flip), as the FixRes fine-tuning phase does."""
    eval_resize: int = 256
    eval_crop: int = 224
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    """RandomResizedCrop area range."""
    ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    """RandomResizedCrop aspect-ratio range."""
    crop: Literal["rrc", "pad"] = "rrc"
    """Training crop: ``rrc`` is RandomResizedCrop (``scale``, ``ratio``); ``pad`` is the standard
    CIFAR crop of He et al. 2016: the shorter side resized to ``train_crop`` (nothing to do for CIFAR
    at 32 px), ``pad`` pixels added on every side, and a random ``train_crop`` square kept."""
    pad: int = 4
    """Pixels added on every side before a ``crop: pad`` crop (He et al. 2016 use 4 at 32 px)."""
    pad_fill: Literal["zero", "reflect"] = "zero"
    """What the padding of a ``crop: pad`` crop holds: ``zero`` (black, as the paper and
    torchvision's RandomCrop default) or ``reflect`` (the image mirrored about its edge)."""
    hflip: bool = True
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    workers: int = 2
    """DataLoader worker processes per rank (0 decodes in the training process)."""
    shuffle_block: int = 1024
    """Samples shuffled together inside each worker's stream (shards are always shuffled)."""
    prefetch: int = 2
    """Batches each worker prepares ahead."""
    policy: Literal["none", "trivialaugment", "randaugment", "autoaugment"] = "none"
    """Per-sample policy augmentation after crop + flip (torchvision's implementations)."""
    randaugment_ops: int = 2
    randaugment_magnitude: int = 9
    repeats: int = 1
    """Repeated augmentation: each sample appears this many times per step, differently augmented,
    on different ranks when the world size allows (Hoffer et al. 2020; DeiT). An epoch keeps its
    number of updates and holds 1/repeats as many distinct samples."""
    random_erasing: float = 0.0
    """Probability of erasing a random box of each training image (Zhong et al. 2020), on the device."""
    bad_samples: Literal["skip", "fail"] = "skip"
    """Unreadable samples (corrupt image, truncated tar, no or out-of-range label): skip and count
    them (each is replaced by a good sample of its batch), or stop the run at the first one."""
    max_bad_fraction: float = 0.01
    """Under ``skip``, stop once more than this fraction of the training samples seen were bad."""
    resample: Literal["none", "class_balanced", "sqrt", "repeat_factor"] = "none"
    """Class-aware resampling of each training epoch (needs class counts in the shard index):
    ``class_balanced`` draws every class equally often, ``sqrt`` in proportion to the square root
    of its size, ``repeat_factor`` repeats each sample of class c max(1, sqrt(t / f_c)) times (LVIS,
    Gupta et al. 2019; f_c the fraction of samples in c, t = ``repeat_threshold``). A sample gets
    the floor or the ceiling of its class's factor, drawn per epoch from the seed, so every class
    gets exactly its share and every epoch has the same length."""
    repeat_threshold: float = 0.001
    """``t`` of ``resample: repeat_factor`` (detectron2's default)."""
    cache_dir: str = ""
    """A node-local directory where remote shards (URLs, ``s3://``, ``pipe:``) are kept after their
    first read, for multi-epoch runs; shared by the node's ranks and workers (one download per
    shard, atomic, never a partial file read). Empty: stream every epoch from the source."""
    cache_max_gb: float = 100.0
    """Size bound of ``cache_dir``: past it, the least recently used shards are deleted."""


@dataclass
class ModelConfig:
    name: str = "resnet50"
    """A torchvision classification model (``resnet50``, ``vit_b_16``, ...), a CIFAR ResNet
    (``cifar_resnet20/32/44/56/110``) or a timm model (``timm/vit_small_patch16_224``, ...)."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the model's builder (timm: ``img_size``, ``drop_rate``, ...; torchvision
    alike); each must be an argument the model takes."""
    norm: Literal["batch", "sync_batch", "group", "layer", "instance", "ghost"] = "batch"
    """Normalisation layers: ``batch`` (the model's own norm layers: LayerNorm for transformers); ``sync_batch`` (statistics over all ranks' micro-batches;
    GPU runs); ``group`` (32 groups), ``layer`` (one group) and ``instance`` (one group per channel),
    all batch-independent; ``ghost`` (BatchNorm over virtual batches of ``ghost_batch_size``)."""
    cifar_stem: bool = False
    """For 32 px images: a ResNet's (torchvision's or timm's) 7x7 stride-2 stem convolution becomes a
    3x3 stride-1 one and its max-pool is dropped, as SimCLR and solo-learn do on CIFAR."""
    zero_init_residual: bool = False
    """Start the last BN gamma of each residual block at 0, so blocks start as identities (Goyal et al.
    2017); timm's ResNets do so by default."""
    ghost_batch_size: int = 0
    """``norm: ghost``: samples per virtual batch on each device."""
    drop_path_rate: float = 0.0
    """Stochastic depth (Huang et al. 2016): the deepest residual branch is dropped with this
    probability per sample, shallower ones linearly less. 0 leaves the model as built (torchvision's
    ConvNeXt, EfficientNet, Swin and MaxViT keep their own default rates)."""
    dropout: float = 0.0
    """Dropout on the features before the classifier; 0 leaves the model as built (e.g. VGG's and
    EfficientNet's own classifier dropout)."""
    init: Literal["default", "he", "xavier", "orthogonal", "trunc_normal"] = "default"
    """Initialisation of conv and linear weights (biases zeroed); ``default`` keeps the model's own."""
    init_gain: Optional[float] = None
    """Gain of ``xavier``/``orthogonal``, standard deviation of ``trunc_normal``; None: the scheme's
    usual value (1, 1, 0.02). ``he`` takes its gain from ReLU."""
    pretrained: str = ""
    """Start from these weights: a run directory, a ``model.safetensors``, a distrain checkpoint
    directory, or a torchvision/timm state-dict file. Never downloaded."""
    pretrained_ignore: list[str] = field(default_factory=list)
    """Names (globs) of pretrained tensors to skip on purpose; the model keeps its own init there."""
    reset_classifier: bool = False
    """Re-initialise the pretrained classifier even when its number of classes matches (transfer to
    other classes)."""
    channels_last: bool = False
    compile: bool = False
    """torch.compile the model (GPU runs; adds start-up time)."""


@dataclass
class BatchConfig:
    per_device: int = 32
    """Samples per device per micro-batch; with ``global_batch`` set, the most a device may take."""
    accumulation: int = 1
    """Micro-batches per optimizer update (ignored when ``global_batch`` is set)."""
    global_batch: int = 0
    """Target samples per update over all devices; > 0 derives per-device batch and accumulation
    for whatever world size the run gets (the fewest micro-batches that fit ``per_device``)."""


@dataclass
class OptimConfig:
    name: Literal["sgd", "adamw", "lars", "lamb"] = "sgd"
    """lars (You et al. 2017) and lamb (You et al. 2019) adapt the LR per layer by a trust ratio,
    for batches beyond 8k; layers without weight decay (norm/bias) are excluded from the ratio."""
    lr: float = 0.1
    """Learning rate at the reference batch ``base_batch``; the peak LR is scaled from it."""
    base_batch: int = 256
    scaling: Literal["linear", "sqrt", "none"] = "linear"
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    norm_bias_decay: bool = False
    """Apply weight decay to norm-layer and bias parameters too (Goyal et al. exclude them)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    trust_coefficient: float = 0.001
    """LARS trust coefficient (eta)."""
    layer_decay: float = 1.0
    """Layer-wise LR decay (BEiT, MAE): block ``i`` of ``n`` (0 the stem, ``n`` the head) trains at
    LR x layer_decay ** (n - i); 1 is off."""
    head_lr_scale: float = 1.0
    """Multiplies the classifier's LR (discriminative LRs for fine-tuning)."""


@dataclass
class ScheduleConfig:
    epochs: int = 90
    warmup_epochs: float = 0.0
    warmup_updates: int = 0
    """Warmup length in updates; overrides ``warmup_epochs`` when > 0."""
    warmup_start_lr: Optional[float] = None
    """LR at update 0 of the warmup; None starts at ``optim.lr`` (the unscaled LR, as Goyal et al.)."""
    decay: Literal["cosine", "multistep", "poly", "constant"] = "cosine"
    milestones: list[float] = field(default_factory=lambda: [30, 60, 80])
    """Epochs at which multistep decay multiplies the LR by ``gamma``."""
    gamma: float = 0.1
    final_lr_factor: float = 0.0
    """Cosine and poly decay to ``peak * final_lr_factor``."""
    power: float = 2.0
    """Exponent of poly decay (1 is linear decay)."""


@dataclass
class TrainConfig:
    label_smoothing: float = 0.0
    clip_grad_norm: Optional[float] = None
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto: bf16 on GPUs with native bf16 (compute capability 8.0+: A100, H100, RTX 30xx and newer),
    fp16 with dynamic loss scaling on older GPUs (V100, T4), fp32 on CPU; each rank asks its own GPU."""
    log_every: int = 10
    """Optimizer updates between logged training metrics."""
    max_updates: int = 0
    """Stop after this many optimizer updates (0 = the full schedule); the schedule is unchanged."""
    nonfinite: Literal["skip", "stop"] = "skip"
    """A non-finite loss or gradient norm: skip that update (and count it), or stop with a
    checkpoint of the last good state."""
    max_consecutive_skips: int = 20
    """Under ``skip``, stop as under ``stop`` after this many non-finite updates in a row."""


@dataclass
class LossConfig:
    """Class-imbalance terms of the label loss (label smoothing is ``train.label_smoothing``)."""

    class_weights: Literal["none", "inverse", "sqrt_inverse", "effective_number"] = "none"
    """Per-class weights from the class counts: 1/n, 1/sqrt(n), or (1 - beta)/(1 - beta^n) (Cui et
    al. 2019); normalised to average 1 over the classes."""
    beta: float = 0.9999
    """``beta`` of ``effective_number`` weights."""
    reweight_epoch: float = 0.0
    """Deferred re-weighting (DRW, Cao et al. 2019): class weights apply from this epoch on."""
    focal_gamma: float = 0.0
    """Focal loss (Lin et al. 2017): each sample's loss times (1 - p_t)^gamma; 0 is off."""
    logit_adjust_tau: float = 0.0
    """Logit-adjusted loss (Menon et al. 2021): tau x log(class prior) added to the logits in the
    training loss only; 0 is off."""


@dataclass
class EvalConfig:
    every_epochs: int = 1
    batch_size: int = 0
    """Per-device eval batch; 0 uses ``batch.per_device``."""


@dataclass
class EMAConfig:
    """Exponential moving average of the weights (Polyak averaging)."""

    decay: float = 0.0
    """Per-update decay; 0 disables EMA. Updates made every N steps use decay**N."""
    every: int = 1
    """Optimizer updates between EMA updates (the torchvision recipe uses 32)."""
    warmup: bool = True
    """Ramp the decay up as (1 + n) / (10 + n) over the first EMA updates."""
    export: bool = False
    """Write the EMA weights (not the raw ones) to ``RUN_DIR/model.safetensors`` at the end."""


@dataclass
class MixConfig:
    """Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019), on the device, per batch."""

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    prob: float = 1.0
    """Probability that a batch is mixed at all."""
    switch_prob: float = 0.5
    """With both alphas > 0, probability of CutMix rather than Mixup for a mixed batch."""


@dataclass
class ProgressiveConfig:
    """Progressive resizing (Howard 2018; FFCV): the training resolution grows over the epochs."""

    start_size: int = 0
    """Training resolution up to ``start_epoch``; 0 disables progressive resizing."""
    end_size: int = 0
    """Resolution from ``end_epoch`` on (the final phase at full size); 0 means ``data.train_crop``."""
    start_epoch: int = 0
    end_epoch: int = 0
    step: int = 32
    """Resolutions in between are linearly interpolated and rounded to a multiple of this."""


@dataclass
class FixResConfig:
    """FixRes fine-tuning (Touvron et al. 2019) after the main schedule, at the test resolution."""

    epochs: int = 0
    """Epochs of the phase; 0 skips it. It trains on test-time preprocessing (data.eval_resize,
    data.eval_crop, flip) from the main run's exported model, into RUN_DIR/fixres."""
    lr: float = 0.001
    """Base LR of the phase at ``optim.base_batch`` (scaled like the main LR), cosine to 0."""
    adapt: Literal["last", "stats", "all"] = "last"
    """Norm layers trained with the classifier: the last one before pooling (the paper's text), only
    that layer's BN statistics (the official code), or all; the other layers are frozen, their BN
    statistics included."""


@dataclass
class TransferConfig:
    """What trains when starting from pretrained weights (Kornblith et al. 2019; ULMFiT)."""

    mode: Literal["full", "linear_probe", "gradual"] = "full"
    """``full``: everything trains (with ``optim.layer_decay``/``head_lr_scale`` for fine-tuning);
    ``linear_probe``: only the classifier, the rest frozen with BN statistics frozen; ``gradual``:
    blocks unfreeze one after another from the head down (see ``unfreeze_every``)."""
    unfreeze_every: float = 1.0
    """``gradual``: epochs between unfreezing successive blocks: the head trains from epoch 0, the
    block below it from ``unfreeze_every``, and so on."""


@dataclass
class EarlyStoppingConfig:
    """Stop when an eval metric stops improving, decided once for all ranks."""

    patience: int = 0
    """Evaluations without improvement before stopping; 0 is off."""
    metric: str = "eval/top1"
    mode: Literal["max", "min"] = "max"
    min_delta: float = 0.0
    """Smallest change that counts as an improvement."""
    restore_best: bool = False
    """Export the best checkpoint's weights (not the last) as ``model.safetensors``."""


@dataclass
class DistillConfig:
    """Knowledge distillation from a frozen teacher (Hinton et al. 2015; DeiT, Touvron et al. 2021)."""

    teacher: str = ""
    """Empty: no distillation. A distrain run directory (its config.yaml names the model; a phase's
    directory, e.g. RUN_DIR/teacher, for a teacher trained earlier in the same recipe), one of its
    checkpoints, a ``model.safetensors`` or a ``torch.save`` state dict (these need ``teacher_model``)."""
    teacher_model: str = ""
    """The teacher's ``model.name``, overriding its run's config (needed for a bare weights file)."""
    teacher_kwargs: dict[str, Any] = field(default_factory=dict)
    kind: Literal["soft", "hard"] = "soft"
    """``soft``: KL(teacher || student) at ``temperature``, x T^2, averaged over samples; ``hard``:
    cross-entropy on the teacher's top-1 (DeiT)."""
    alpha: float = 0.5
    """Loss = (1 - alpha) x label loss + alpha x distillation loss."""
    temperature: float = 1.0
    """Softens both distributions of the ``soft`` loss (Hinton et al. use 2-20; DeiT 1)."""
    teacher_mean: list[float] = field(default_factory=list)
    """The teacher's input normalisation when it differs from ``data.mean``/``data.std`` (empty: the same)."""
    teacher_std: list[float] = field(default_factory=list)
    teacher_resolution: int = 0
    """Resize the student's batch to this side for the teacher (0: the student's)."""


@dataclass
class SSLConfig:
    """Self-supervised pretraining: the phase learns from two augmented views of unlabeled images."""

    method: Literal["none", "simclr", "byol"] = "none"
    """``simclr``: NT-Xent over the global batch, negatives from every rank (Chen et al. 2020);
    ``byol``: an online network with a predictor regresses an EMA target's projection of the other
    view (Grill et al. 2020)."""
    temperature: float = 0.2
    """NT-Xent's temperature."""
    proj_hidden: int = 2048
    """Hidden width of the projection head (an MLP after the backbone's pooled features)."""
    proj_dim: int = 128
    """Output width of the projection head (what the loss compares); BYOL: 4096 -> 256."""
    pred_hidden: int = 4096
    """BYOL: hidden width of the predictor MLP (proj_dim -> pred_hidden -> proj_dim), 4096 as BYOL
    and solo-learn's CIFAR recipe."""
    target_momentum: float = 0.99
    """BYOL: the target's EMA momentum tau at the first update, raised to 1 along a cosine over the
    phase's updates (BYOL: 0.996 on ImageNet; solo-learn CIFAR: 0.99)."""
    color_strength: float = 0.5
    """SimCLR's colour-jitter strength s: 0.5 for CIFAR, 1.0 for ImageNet."""
    blur_prob: float = 0.0
    """Gaussian blur probability per view (SimCLR: 0.5 on ImageNet, none on CIFAR). BYOL's views are
    asymmetric: view 0 gets ``blur_prob``, view 1 a tenth of it (BYOL: 1.0 -> 1.0 and 0.1)."""
    solarize_prob: Optional[float] = None
    """Solarisation probability of view 1 (view 0 is never solarised); None: the method's own, 0.2
    under byol (BYOL, solo-learn CIFAR), 0 under simclr."""
    knn_k: int = 200
    """Neighbours of the kNN monitor (Wu et al. 2018)."""
    knn_temperature: float = 0.07
    """Temperature of the kNN monitor's neighbour weights exp(similarity / T)."""
    knn_at_start: bool = True
    """Also run the kNN monitor before the first update (the random-init baseline)."""


@dataclass
class LabelPropagationConfig:
    """Semi-supervised training with label propagation (Iscen et al. 2019): every ``every_epochs``
    epochs the phase propagates the known labels over a kNN graph of its features of every training
    sample, then trains on all of them with the pseudo-labels, weighted by their certainty."""

    enabled: bool = False
    every_epochs: int = 1
    """Epochs between propagations (one before the phase's first update, then one every N epochs)."""
    k: int = 50
    """Neighbours per sample in the graph."""
    power: float = 3.0
    """Affinities are cosine similarities (clamped at 0) raised to this power (the paper: 3)."""
    alpha: float = 0.99
    """Diffusion strength: Z solves (I - alpha S) Z = Y."""
    cg_iters: int = 20
    """Conjugate-gradient iterations per class (the reference code: 20)."""
    class_weights: bool = True
    """Weight each class's loss by the inverse of its pseudo-label count (the paper)."""
    block: int = 1024
    """Query rows per block of the exact kNN search: memory 4 x block x N bytes."""
    labeled_share: float = 0.0
    """Share of each epoch (and so of each batch, on average) given to labeled samples, which are
    oversampled to reach it (the reference code: half of each batch); 0 keeps the data's own share."""

    @property
    def epoch_share(self) -> float:
        """The labeled share the phase's epochs are expanded to (0: none, also when LP is off)."""
        return self.labeled_share if self.enabled else 0.0


@dataclass
class CheckpointConfig:
    every_epochs: int = 1
    keep_last: int = 2
    keep_best: bool = True
    """Also keep the checkpoint with the best eval/top1 (the best ``early_stopping.metric`` when
    early stopping or ``restore_best`` is on)."""


@dataclass
class LoggingConfig:
    wandb: bool = True
    project: str = "distrain"
    progress: bool = True
    """Rank-0 progress bar."""
    draws: bool = False
    """Write every rank's device-side random draws (erased images, MixUp/CutMix lambda and box, and
    checksums of the augmented batch) to ``RUN_DIR/draws/rank<R>.jsonl``: an audit of per-rank
    randomness and exact resume (two host synchronisations per micro-batch on a GPU)."""


@dataclass
class PreemptionConfig:
    """What SIGUSR1/SIGTERM (sent by SLURM before a time limit or preemption) do."""

    check_every: int = 1
    """Updates between the all-reduces that let every rank agree to stop at the same update."""
    requeue: bool = False
    """After the preemption checkpoint, run ``scontrol requeue $SLURM_JOB_ID`` (inside SLURM)."""


@dataclass
class DistributedConfig:
    backend: Literal["ddp", "deepspeed"] = "ddp"
    """ddp: PyTorch DistributedDataParallel; deepspeed: DeepSpeed ZeRO through Accelerate (an
    Accelerate DeepSpeed launch config selects it too)."""
    timeout_s: int = 1800
    """Process-group timeout: a dead or stuck rank fails the job after this long instead of hanging."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage: 1 partitions optimizer state, 2 also gradients, 3 also parameters."""
    offload_optimizer: bool = False
    """DeepSpeed: keep optimizer state (and its step) in CPU memory."""
    offload_params: bool = False
    """DeepSpeed ZeRO-3: keep parameters in CPU memory between uses."""
    deepspeed_config: str = ""
    """A DeepSpeed JSON to start from: distrain fills its "auto" values from the recipe and refuses
    values that contradict it; its other settings (buckets, thresholds, ...) are kept."""


@dataclass
class Config:
    """A whole run. Every field has a default that works; recipes change what they need."""

    name: str = "run"
    seed: int = 0
    deterministic: bool = False
    """Deterministic algorithms everywhere the platform has them (slower on GPU: no cuDNN autotuning,
    deterministic kernels); data order and augmentation are deterministic regardless."""
    run_dir: str = ""
    """Where outputs go; empty means ``runs/<name>``."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    mix: MixConfig = field(default_factory=MixConfig)
    progressive: ProgressiveConfig = field(default_factory=ProgressiveConfig)
    fixres: FixResConfig = field(default_factory=FixResConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    ssl: SSLConfig = field(default_factory=SSLConfig)
    lp: LabelPropagationConfig = field(default_factory=LabelPropagationConfig)
    preemption: PreemptionConfig = field(default_factory=PreemptionConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    phases: list[dict[str, Any]] = field(default_factory=list)
    """Phases run in order, each a partial recipe over this one with its ``name`` (its run
    subdirectory and W&B prefix); each starts from the previous phase's exported weights."""

    @property
    def out_dir(self) -> Path:
        return Path(self.run_dir or f"runs/{self.name}")


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as e:
        raise DistrainError(f"cannot read config {path}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise DistrainError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise DistrainError(f"{path}: a recipe must be a YAML mapping, got {type(data).__name__}")
    return data


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_recipe(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """Read a YAML recipe and the chain of files it ``extends``, merged into one mapping.

    Args:
        path: The recipe file.

    Returns:
        The merged mapping (not yet validated).

    Raises:
        DistrainError: unreadable file, bad YAML, or an ``extends`` cycle.
    """
    path = Path(path).resolve()
    if path in _seen:
        raise DistrainError(f"{path}: 'extends' cycle through {' -> '.join(p.name for p in _seen)}")
    data = _read_yaml(path)
    base = data.pop("extends", None)
    if base is None:
        return data
    bases = base if isinstance(base, list) else [base]
    merged: dict = {}
    for b in bases:
        merged = _deep_merge(merged, load_recipe(path.parent / b, _seen + (path,)))
    return _deep_merge(merged, data)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set ``a.b.c=value`` overrides on a recipe mapping (values parsed as YAML).

    Raises:
        DistrainError: an override without ``=`` or with an empty key.
    """
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise DistrainError(f"override {item!r} is not of the form section.key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[parts[-1]] = value
    return data


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "mapping"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` as type ``tp`` or raise naming ``key``; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except DistrainError:
                continue
    elif origin is list:
        if isinstance(value, list):
            (inner,) = typing.get_args(tp)
            return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            _, inner = typing.get_args(tp)
            return {k: v if inner is Any else _coerce(v, inner, f"{key}.{k}") for k, v in value.items()}
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads 5e-4 (no dot) as a string; users mean the number.
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return _build(tp, value, key + ".")
    raise DistrainError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else f" (valid: {', '.join(names)})"
            raise DistrainError(f"unknown config key {prefix}{key}{hint}")
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    return cls(**kwargs)


def _check_values(cfg: Config) -> None:
    """Range checks that types alone cannot express; each names its key."""
    positive = {
        "batch.per_device": cfg.batch.per_device,
        "batch.accumulation": cfg.batch.accumulation,
        "optim.base_batch": cfg.optim.base_batch,
        "schedule.epochs": cfg.schedule.epochs,
        "data.train_crop": cfg.data.train_crop,
        "data.eval_crop": cfg.data.eval_crop,
        "data.eval_resize": cfg.data.eval_resize,
        "data.shuffle_block": cfg.data.shuffle_block,
        "train.log_every": cfg.train.log_every,
        "eval.every_epochs": cfg.eval.every_epochs,
        "checkpoint.every_epochs": cfg.checkpoint.every_epochs,
        "checkpoint.keep_last": cfg.checkpoint.keep_last,
        "distributed.timeout_s": cfg.distributed.timeout_s,
        "data.prefetch": cfg.data.prefetch,
        "data.repeats": cfg.data.repeats,
        "train.max_consecutive_skips": cfg.train.max_consecutive_skips,
        "ema.every": cfg.ema.every,
        "preemption.check_every": cfg.preemption.check_every,
    }
    for key, v in positive.items():
        if v <= 0:
            raise DistrainError(f"{key}: must be > 0, got {v}")
    non_negative = {
        "optim.lr": cfg.optim.lr,
        "optim.weight_decay": cfg.optim.weight_decay,
        "schedule.warmup_epochs": cfg.schedule.warmup_epochs,
        "data.workers": cfg.data.workers,
        "data.num_classes": cfg.data.num_classes,
        "data.train_samples": cfg.data.train_samples,
        "train.max_updates": cfg.train.max_updates,
        "eval.batch_size": cfg.eval.batch_size,
        "model.ghost_batch_size": cfg.model.ghost_batch_size,
        "schedule.warmup_updates": cfg.schedule.warmup_updates,
        "mix.mixup_alpha": cfg.mix.mixup_alpha,
        "mix.cutmix_alpha": cfg.mix.cutmix_alpha,
        "data.randaugment_ops": cfg.data.randaugment_ops,
        "data.train_resize": cfg.data.train_resize,
        "data.pad": cfg.data.pad,
        "batch.global_batch": cfg.batch.global_batch,
        "progressive.start_size": cfg.progressive.start_size,
        "progressive.end_size": cfg.progressive.end_size,
        "progressive.start_epoch": cfg.progressive.start_epoch,
        "fixres.epochs": cfg.fixres.epochs,
        "fixres.lr": cfg.fixres.lr,
    }
    for key, v in non_negative.items():
        if v < 0:
            raise DistrainError(f"{key}: must be >= 0, got {v}")
    for key, p in (("data.random_erasing", cfg.data.random_erasing), ("mix.prob", cfg.mix.prob),
                   ("mix.switch_prob", cfg.mix.switch_prob)):
        if not 0.0 <= p <= 1.0:
            raise DistrainError(f"{key}: a probability in [0, 1], got {p}")
    if not 0.0 <= cfg.ema.decay < 1.0:
        raise DistrainError(f"ema.decay: must be in [0, 1), got {cfg.ema.decay}")
    if cfg.model.ghost_batch_size and not cfg.batch.global_batch and cfg.batch.per_device % cfg.model.ghost_batch_size:
        raise DistrainError(
            f"model.ghost_batch_size: batch.per_device {cfg.batch.per_device} is not a multiple of "
            f"{cfg.model.ghost_batch_size}"
        )
    if cfg.data.cache_max_gb <= 0:
        raise DistrainError(f"data.cache_max_gb: must be positive, got {cfg.data.cache_max_gb}")
    if not 0.0 <= cfg.data.max_bad_fraction <= 1.0:
        raise DistrainError(f"data.max_bad_fraction: must be in [0, 1], got {cfg.data.max_bad_fraction}")
    for key, v in (("data.repeat_threshold", cfg.data.repeat_threshold), ("loss.focal_gamma", cfg.loss.focal_gamma),
                   ("loss.logit_adjust_tau", cfg.loss.logit_adjust_tau), ("loss.reweight_epoch", cfg.loss.reweight_epoch)):
        if v < 0:
            raise DistrainError(f"{key}: must be >= 0, got {v}")
    if not 0.0 < cfg.loss.beta < 1.0:
        raise DistrainError(f"loss.beta: must be in (0, 1), got {cfg.loss.beta}")
    if cfg.loss.reweight_epoch and cfg.loss.class_weights == "none":
        raise DistrainError("loss.reweight_epoch: defers class weights, but loss.class_weights is none")
    if not 0.0 <= cfg.train.label_smoothing < 1.0:
        raise DistrainError(f"train.label_smoothing: must be in [0, 1), got {cfg.train.label_smoothing}")
    if cfg.train.clip_grad_norm is not None and cfg.train.clip_grad_norm <= 0:
        raise DistrainError(f"train.clip_grad_norm: must be > 0 or null, got {cfg.train.clip_grad_norm}")
    if cfg.schedule.warmup_epochs > cfg.schedule.epochs:
        raise DistrainError(
            f"schedule.warmup_epochs: {cfg.schedule.warmup_epochs} is longer than schedule.epochs {cfg.schedule.epochs}"
        )
    for key, pair in (("data.scale", cfg.data.scale), ("data.ratio", cfg.data.ratio)):
        if len(pair) != 2 or not 0 < pair[0] <= pair[1]:
            raise DistrainError(f"{key}: expected [low, high] with 0 < low <= high, got {pair}")
    if cfg.data.scale[1] > 1:
        raise DistrainError(f"data.scale: the upper bound is a fraction of the image area (<= 1), got {cfg.data.scale}")
    for key, vec in (("data.mean", cfg.data.mean), ("data.std", cfg.data.std)):
        if len(vec) != 3:
            raise DistrainError(f"{key}: expected 3 values (RGB), got {vec}")
    if min(cfg.data.std) <= 0:
        raise DistrainError(f"data.std: every value must be > 0, got {cfg.data.std}")
    if len(cfg.optim.betas) != 2:
        raise DistrainError(f"optim.betas: expected [beta1, beta2], got {cfg.optim.betas}")
    if cfg.data.eval_crop > cfg.data.eval_resize:
        raise DistrainError(
            f"data.eval_crop: {cfg.data.eval_crop} is larger than data.eval_resize {cfg.data.eval_resize}"
        )
    from distrain.engine.selfsup import check_ssl
    from distrain.engine.semisup import check_label_propagation
    from distrain.models.factory import check_model
    from distrain.tricks.early_stopping import check_config as check_early_stopping
    from distrain.tricks.transfer import check_transfer

    check_model(cfg.model)
    check_early_stopping(cfg)
    check_transfer(cfg)
    check_ssl(cfg)
    check_label_propagation(cfg)
    d = cfg.distill
    if d.teacher:
        from distrain.tricks.distill import check_distill

        check_distill(d.kind, d.alpha, d.temperature, d.teacher_mean, d.teacher_std, d.teacher_resolution)
    if cfg.optim.nesterov and cfg.optim.momentum <= 0:
        raise DistrainError("optim.nesterov: needs optim.momentum > 0")
    if cfg.data.train_resize and cfg.data.train_crop > cfg.data.train_resize:
        raise DistrainError(
            f"data.train_crop: {cfg.data.train_crop} is larger than data.train_resize {cfg.data.train_resize}"
        )
    pr = cfg.progressive
    if cfg.data.crop == "pad" and cfg.data.pad_fill == "reflect":
        # A reflection can only mirror as many pixels as the (resized) image has beside its edge.
        side = min(s for s in (cfg.data.train_crop, pr.start_size, pr.end_size) if s)
        if cfg.data.pad >= side:
            raise DistrainError(f"data.pad: reflect fill needs a pad smaller than the training resolution {side}, "
                                f"got {cfg.data.pad} (use data.pad_fill=zero or a smaller pad)")
    if pr.start_size:
        if pr.step <= 0:
            raise DistrainError(f"progressive.step: must be > 0, got {pr.step}")
        if not pr.start_epoch <= pr.end_epoch <= cfg.schedule.epochs:
            raise DistrainError(
                f"progressive.end_epoch: need progressive.start_epoch {pr.start_epoch} <= end_epoch {pr.end_epoch} "
                f"<= schedule.epochs {cfg.schedule.epochs}"
            )
    if cfg.distributed.backend == "deepspeed" and cfg.optim.name in ("lars", "lamb"):
        raise DistrainError(
            f"optim.name: {cfg.optim.name} computes a trust ratio per layer, but DeepSpeed ZeRO (distributed.backend) "
            "hands the optimizer flattened partitions of many layers; use ddp, or sgd/adamw"
        )
    if cfg.distributed.zero_stage not in (1, 2, 3):
        raise DistrainError(f"distributed.zero_stage: must be 1, 2 or 3, got {cfg.distributed.zero_stage}")
    if cfg.distributed.offload_params and cfg.distributed.zero_stage != 3:
        raise DistrainError("distributed.offload_params: needs distributed.zero_stage 3")
    if cfg.distributed.deepspeed_config and not Path(cfg.distributed.deepspeed_config).is_file():
        raise DistrainError(f"distributed.deepspeed_config: no such file {cfg.distributed.deepspeed_config}")
    if sorted(cfg.schedule.milestones) != cfg.schedule.milestones:
        raise DistrainError(f"schedule.milestones: must be increasing, got {cfg.schedule.milestones}")


_PHASE_NAME = re.compile(r"[A-Za-z0-9_-]+")
# Names a phase cannot take: the run dir's own entries (the FixRes phase is RUN_DIR/fixres).
_RESERVED_PHASE_NAMES = {"fixres", "checkpoints", "draws", "wandb"}
# Settings of the whole chain, which a phase cannot change: the run's identity, and what the one
# Accelerator of the run (its process group, precision, compile and DeepSpeed engine settings)
# and its one W&B run are built from.
_CHAIN_KEYS = ("name", "run_dir", "phases", "deterministic", "train.precision", "model.compile", "distributed",
               "logging.wandb", "logging.project")


def _has_key(tree: dict, dotted: str) -> bool:
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _phase_errors(where: str):
    """Prefix a phase's validation errors with the phase."""

    class _Prefixed:
        def __enter__(self):
            return self

        def __exit__(self, kind, error, tb):
            if isinstance(error, DistrainError):
                raise DistrainError(f"{where}: {error}") from None

    return _Prefixed()


def phase_configs(cfg: Config) -> list[Config]:
    """The validated config of each phase of ``cfg.phases``, in order (empty without phases).

    Phase ``i`` is ``cfg`` with the phase's partial recipe merged over it, its run dir
    ``RUN_DIR/<phase name>``, and, unless the phase sets its own ``model.pretrained`` (``""``: start
    from scratch, e.g. another architecture), the previous phase's final export as ``model.pretrained`` (its FixRes phase's, if it has one),
    loaded whole: ``pretrained_ignore`` and ``reset_classifier`` apply only where the phase sets them.

    Raises:
        DistrainError: a phase without a valid, unique name, setting a whole-chain key, or any
            invalid value, its FixRes phase's included (named as ``phases[i] (name): key: ...``).
    """
    base = to_dict(cfg)
    del base["phases"]
    configs: list[Config] = []
    for i, phase in enumerate(cfg.phases):
        name = phase.get("name")
        if not isinstance(name, str) or not _PHASE_NAME.fullmatch(name) or name in _RESERVED_PHASE_NAMES:
            raise DistrainError(
                f"phases[{i}].name: each phase needs a name of letters, digits, '-' or '_' (not "
                f"{', '.join(sorted(_RESERVED_PHASE_NAMES))}), got {name!r}"
            )
        if any(c.out_dir.name == name for c in configs):
            raise DistrainError(f"phases[{i}].name: {name!r} names two phases")
        where = f"phases[{i}] ({name})"
        own = {k: v for k, v in phase.items() if k != "name"}  # a phase's "name" is its own
        chain = [key for key in _CHAIN_KEYS if _has_key(own, key)]
        if chain:
            raise DistrainError(f"{where}: {chain[0]} belongs to the whole recipe, not to one phase")
        own_model = phase.get("model", {})
        if not isinstance(own_model, dict):
            raise DistrainError(f"{where}: model: expected a mapping, got {own_model!r}")
        merged = _deep_merge(base, own)
        merged["run_dir"] = str(cfg.out_dir / name)
        if configs and "pretrained" not in own_model:
            previous = configs[-1]
            start = previous.out_dir / "fixres" if previous.fixres.epochs else previous.out_dir
            # A self-supervised phase exports its backbone alone: the classifier starts at its init.
            reset = previous.ssl.method != "none"
            merged["model"].update(pretrained=str(start), pretrained_ignore=own_model.get("pretrained_ignore", []),
                                   reset_classifier=own_model.get("reset_classifier", reset))
        with _phase_errors(where):
            configs.append(_validated(merged))
            if cfg.distributed.backend == "deepspeed" and _has_key(phase, "train.clip_grad_norm"):
                # DeepSpeed clips inside its engine, whose config the first phase fixed.
                raise DistrainError("train.clip_grad_norm: under DeepSpeed it belongs to the whole recipe")
    return configs


def from_dict(data: dict) -> Config:
    """Validate a recipe mapping against the schema, phases and teachers included.

    Raises:
        DistrainError: naming the first unknown key, wrongly typed value or out-of-range value.
    """
    cfg = _validated(data)
    _check_teachers(cfg, phase_configs(cfg))
    return cfg


def _validated(data: dict) -> Config:
    """:func:`from_dict` but for the teachers' files, which earlier phases may not have written yet."""
    cfg = _build(Config, data)
    _check_values(cfg)
    if cfg.phases and cfg.fixres.epochs:
        raise DistrainError("fixres.epochs: with phases, set it in the phase that FixRes follows")
    if cfg.fixres.epochs:
        from distrain.tricks.fixres import fixres_config

        with _phase_errors("fixres phase"):
            fixres_config(cfg)  # validates the phase that will run after this one
    phase_configs(cfg)
    return cfg


def _check_teachers(cfg: Config, phases: list[Config]) -> None:
    """Refuse a teacher that cannot be found or built, before anything runs: a typo must not cost a
    teacher phase's hours. A teacher that an earlier phase of this recipe will train is not there yet."""
    from distrain.tricks.distill import teacher_model_config

    earlier: set[Path] = set()
    for i, c in enumerate(phases or [cfg]):
        d = c.distill
        if d.teacher and Path(d.teacher).resolve() not in earlier:
            with _phase_errors(f"phases[{i}] ({c.out_dir.name})") if phases else contextlib.nullcontext():
                teacher_model_config(d.teacher, d.teacher_model, d.teacher_kwargs)
        earlier |= {c.out_dir.resolve(), (c.out_dir / "fixres").resolve()}


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Load a recipe (with its ``extends`` chain), apply overrides and validate.

    Args:
        path: The YAML recipe.
        overrides: ``section.key=value`` strings, applied in order after the recipe.

    Returns:
        The validated :class:`Config`.
    """
    return from_dict(apply_overrides(load_recipe(path), overrides or []))


def to_dict(cfg: Config) -> dict:
    """The config as plain data (what ``config.yaml`` and W&B receive)."""
    return dataclasses.asdict(cfg)


def dump(cfg: Config) -> str:
    """The resolved config as YAML; :func:`from_dict` of its parse gives back an equal config."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
