"""FixRes fine-tuning (Touvron et al. 2019, "Fixing the train-test resolution discrepancy").

A model trained on RandomResizedCrop sees objects larger than at test time. After the main
schedule, a short phase at the test resolution with test-time preprocessing fixes the
discrepancy: only the classifier and the norm layer before pooling learn (the paper's choice),
and that layer's BN statistics adapt to the test-time distribution. Everything else is frozen,
including the running statistics of the other BN layers, which stay in eval mode.
"""

from __future__ import annotations

from torch import nn

from distrain.config import Config, from_dict, to_dict
from distrain.models.norms import NORM_LAYERS
from distrain.tricks.transfer import classifier_modules, freeze_all_but


def fixres_config(cfg: Config) -> Config:
    """The config of the FixRes phase of ``cfg``: its own run dir, LR and epochs, test-time crops.

    It starts from the exported weights of ``cfg``'s run. Per-sample and per-batch augmentation,
    repeated augmentation, progressive resizing, EMA, transfer settings, early stopping and
    distillation are off;
    the batch, optimizer and label smoothing are the main run's.
    """
    d = to_dict(cfg)
    d["run_dir"] = str(cfg.out_dir / "fixres")
    d["model"].update(pretrained=str(cfg.out_dir), pretrained_ignore=[], reset_classifier=False)
    d["transfer"]["mode"] = "full"
    d["early_stopping"].update(patience=0, restore_best=False)
    d["fixres"]["epochs"] = 0  # this is the FixRes phase: none follows it
    d["distill"]["teacher"] = ""
    d["data"].update(train_crop=cfg.data.eval_crop, train_resize=cfg.data.eval_resize, policy="none",
                     random_erasing=0.0, repeats=1)
    d["mix"].update(mixup_alpha=0.0, cutmix_alpha=0.0)
    d["ema"].update(decay=0.0, export=False)
    d["progressive"]["start_size"] = 0
    d["optim"].update(lr=cfg.fixres.lr, layer_decay=1.0, head_lr_scale=1.0)
    d["schedule"].update(epochs=cfg.fixres.epochs, warmup_epochs=0.0, warmup_updates=0, warmup_start_lr=None,
                         decay="cosine", final_lr_factor=0.0)
    d["train"]["max_updates"] = 0
    return from_dict(d)


def freeze_for_fixres(model: nn.Module, adapt: str) -> list[nn.Module]:
    """Freeze every parameter except the classifier's and the adapted norm layers' (before wrapping).

    Args:
        model: The unwrapped model.
        adapt: ``"last"``: the last norm layer in module order (the one before pooling in ResNets);
            ``"stats"``: that layer re-estimates its statistics but its affine parameters stay
            frozen (the official FixRes code); ``"all"``: every norm layer.

    Returns:
        The adapted norm layers, which alone stay in training mode (see :func:`distrain.tricks.transfer.train_only`).

    Raises:
        DistrainError: the model has no classifier that can be told.
    """
    norms = [m for m in model.modules() if isinstance(m, NORM_LAYERS)]
    adapted = norms if adapt == "all" else norms[-1:]
    freeze_all_but(model, [*classifier_modules(model), *(adapted if adapt != "stats" else [])])
    return adapted
