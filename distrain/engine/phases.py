"""A run as a chain of phases, and where a resumed chain continues.

Without ``phases`` a recipe is one phase, ``main``, in the run dir, followed by FixRes when
``fixres.epochs`` is set. With ``phases`` each named phase runs in ``RUN_DIR/<name>`` (see
:func:`distrain.config.phase_configs`), FixRes after any phase that sets it. Every phase after the
first starts from the previous one's ``model.safetensors``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from distrain.config import Config, phase_configs
from distrain.track.checkpoint import checkpoint_dirs, load_trainer_state
from distrain.tricks.fixres import fixres_config


@dataclass(frozen=True)
class Phase:
    """One phase of a run.

    Attributes:
        name: ``main`` for a recipe without phases, else the phase's name (``<name>/fixres`` or
            ``fixres`` for a FixRes phase).
        cfg: The phase's validated config; its run dir is the phase's directory.
        fixres: A FixRes phase: only the classifier and the adapted norm layers train.
        log_prefix: Prepended to the phase's W&B keys (one W&B run holds the whole chain).
        index: Its place in the chain (part of its device-side seeds: see :mod:`distrain.parallel.rng`).
    """

    name: str
    cfg: Config
    fixres: bool = False
    log_prefix: str = ""
    index: int = 0


def chain(cfg: Config) -> list[Phase]:
    """The phases of ``cfg`` in the order they run."""
    named = bool(cfg.phases)
    phases = []
    for phase_cfg in phase_configs(cfg) or [cfg]:
        name = phase_cfg.out_dir.name if named else "main"
        prefix = f"{name}/" if named else ""
        phases.append(Phase(name, phase_cfg, False, prefix, len(phases)))
        if phase_cfg.fixres.epochs:
            phases.append(Phase(prefix + "fixres", fixres_config(phase_cfg), True, prefix + "fixres/", len(phases)))
    return phases


def resume_point(phases: list[Phase], resume: str | None) -> tuple[int, int]:
    """The phase a run (re)starts in, and the updates of the phases before it (W&B's step offset).

    ``--resume auto`` skips every phase that finished (it wrote its summary, the last thing a phase
    does, or a later phase has checkpoints); the last phase always runs (resuming a finished run
    re-exports it). An explicit checkpoint path continues in the phase whose run dir holds it.
    """
    if not resume or len(phases) == 1:
        return 0, 0
    if resume == "auto":
        first = 0
        for i, phase in enumerate(phases[:-1]):
            later_started = any(checkpoint_dirs(p.cfg.out_dir) for p in phases[i + 1:])
            if later_started or (phase.cfg.out_dir / "summary.json").is_file():
                first = i + 1
    else:
        path = Path(resume).resolve()
        holders = [i for i, p in enumerate(phases) if p.cfg.out_dir.resolve() in (path, *path.parents)]
        first = max(holders, default=0)
    return first, sum(_updates(p) for p in phases[:first])


def _updates(phase: Phase) -> int:
    """The updates a finished (or later-superseded) phase made."""
    summary = phase.cfg.out_dir / "summary.json"
    if summary.is_file():
        return json.loads(summary.read_text())["updates"]
    return load_trainer_state(checkpoint_dirs(phase.cfg.out_dir)[-1]).update
