"""Recipes as a chain of phases: each a partial recipe over the base one, in its own run dir,
starting from the previous phase's export; one W&B run; ``--resume auto`` continues in the right phase."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from conftest import checked, distrain, read_jsonl
from safetensors.torch import load_file
from test_train import recipe
from wandb_offline import read_offline_runs

from distrain.config import from_dict, phase_configs
from distrain.engine.phases import chain, resume_point
from distrain.errors import DistrainError
from distrain.track.checkpoint import STATE_NAME

BASE = {"run_dir": "/runs/r", "model": {"name": "cifar_resnet20"}, "optim": {"lr": 0.1}}


def test_each_phase_is_the_base_recipe_with_its_part_merged_over_it():
    cfg = from_dict({**BASE, "phases": [
        {"name": "pre", "schedule": {"epochs": 3}},
        {"name": "tune", "optim": {"lr": 0.01}, "model": {"reset_classifier": True}},
        {"name": "own", "model": {"pretrained": "/weights/x.safetensors"}},
        {"name": "fresh", "model": {"name": "cifar_resnet32", "pretrained": ""}},
    ]})
    pre, tune, own, fresh = phase_configs(cfg)
    assert [str(c.out_dir) for c in (pre, tune, own)] == ["/runs/r/pre", "/runs/r/tune", "/runs/r/own"]
    assert (pre.schedule.epochs, pre.optim.lr, pre.model.pretrained) == (3, 0.1, "")
    # The second phase starts from the first's run dir (its export); the merge is deep.
    assert (tune.schedule.epochs, tune.optim.lr, tune.optim.momentum) == (90, 0.01, 0.9)
    assert (tune.model.pretrained, tune.model.reset_classifier, tune.model.name) == ("/runs/r/pre", True, "cifar_resnet20")
    assert own.model.pretrained == "/weights/x.safetensors"  # a phase may name its own start...
    assert (fresh.model.pretrained, fresh.model.name) == ("", "cifar_resnet32")  # ...or none
    assert all(c.phases == [] for c in (pre, tune, own, fresh))


@pytest.mark.parametrize("phases, message", [
    ([{"schedule": {"epochs": 1}}], r"phases\[0\]\.name: each phase needs a name"),
    ([{"name": "a b"}], r"phases\[0\]\.name"),
    ([{"name": "fixres"}], r"phases\[0\]\.name"),
    ([{"name": "a"}, {"name": "a"}], r"phases\[1\]\.name: 'a' names two phases"),
    ([{"name": "a", "run_dir": "/x"}], r"phases\[0\] \(a\): run_dir belongs to the whole recipe"),
    ([{"name": "a"}, {"name": "b", "optim": {"lr": -1}}], r"phases\[1\] \(b\): optim\.lr: must be >= 0"),
    ([{"name": "a", "optim": {"lr_typo": 1}}], r"phases\[0\] \(a\): unknown config key optim\.lr_typo"),
])
def test_a_bad_phase_fails_validation_naming_the_phase(phases, message):
    with pytest.raises(DistrainError, match=message):
        from_dict({**BASE, "phases": phases})


def test_a_later_phase_loads_the_previous_export_whole_and_cannot_change_the_run_itself():
    cfg = from_dict({**BASE, "model": {"name": "cifar_resnet20", "pretrained": "/w/in.pth", "reset_classifier": True,
                                       "pretrained_ignore": ["fc.*"]},
                     "phases": [{"name": "ft"}, {"name": "more"}, {"name": "other", "model": {"reset_classifier": True}}]})
    ft, more, other = phase_configs(cfg)
    assert (ft.model.pretrained, ft.model.reset_classifier, ft.model.pretrained_ignore) == ("/w/in.pth", True, ["fc.*"])
    # The fine-tuned head is kept: the base recipe's reset and ignore were for the first start only.
    assert (more.model.pretrained, more.model.reset_classifier, more.model.pretrained_ignore) == ("/runs/r/ft", False, [])
    assert (other.model.pretrained, other.model.reset_classifier) == ("/runs/r/more", True)
    # What the run's one Accelerator and W&B run are built from cannot change between phases.
    for key, value in (("train", {"precision": "fp32"}), ("distributed", {"zero_stage": 3}),
                       ("model", {"compile": True}), ("deterministic", True), ("logging", {"project": "x"})):
        with pytest.raises(DistrainError, match=r"phases\[1\] \(b\): .* belongs to the whole recipe"):
            from_dict({**BASE, "phases": [{"name": "a"}, {"name": "b", key: value}]})
    with pytest.raises(DistrainError, match=r"phases\[1\] \(b\): model: expected a mapping"):
        from_dict({**BASE, "phases": [{"name": "a"}, {"name": "b", "model": 5}]})


def test_fixres_follows_the_phase_that_sets_it():
    with pytest.raises(DistrainError, match="fixres.epochs: with phases"):
        from_dict({**BASE, "fixres": {"epochs": 1}, "phases": [{"name": "a"}]})
    phases = chain(from_dict({**BASE, "phases": [{"name": "a", "fixres": {"epochs": 1}}, {"name": "b"}]}))
    assert [(p.name, str(p.cfg.out_dir), p.fixres, p.log_prefix) for p in phases] == [
        ("a", "/runs/r/a", False, "a/"), ("a/fixres", "/runs/r/a/fixres", True, "a/fixres/"),
        ("b", "/runs/r/b", False, "b/")]
    assert phases[1].cfg.model.pretrained == "/runs/r/a"  # FixRes adapts a's export...
    assert phases[2].cfg.model.pretrained == "/runs/r/a/fixres"  # ...and b starts from a's final one
    (main, fixres) = chain(from_dict({**BASE, "fixres": {"epochs": 1}}))
    assert (main.name, main.log_prefix, fixres.name, fixres.log_prefix) == ("main", "", "fixres", "fixres/")


def test_plan_prints_each_phase(tmp_path, capsys):
    import yaml

    from distrain.cli import main

    recipe_path = tmp_path / "chain.yaml"
    recipe_path.write_text(yaml.safe_dump({**BASE, "data": {"train_samples": 1000}, "batch": {"per_device": 100},
                                           "phases": [{"name": "pre", "schedule": {"epochs": 2}},
                                                      {"name": "probe", "data": {"train_samples": 500},
                                                       "transfer": {"mode": "linear_probe"}}]}))
    assert main(["plan", str(recipe_path)]) == 0
    out = capsys.readouterr().out
    pre, probe = out.split("phase 2/2: probe")

    def rows(text: str) -> dict[str, str]:
        return dict(re.split(r"\s{2,}", line, maxsplit=1) for line in text.splitlines()[1:] if "  " in line)

    assert pre.startswith("phase 1/2: pre") and rows(pre)["total updates"] == "20"
    assert "starts from" not in rows(pre)
    probe_rows = rows(probe)
    assert (probe_rows["updates per epoch"], probe_rows["total updates"]) == ("5", "450")
    assert probe_rows["starts from"] == "/runs/r/pre"  # the first phase's export
    assert "fc" in probe_rows["parameter groups"]  # the linear probe trains the classifier alone


def _finished(phase, updates: int) -> None:
    phase.cfg.out_dir.mkdir(parents=True, exist_ok=True)
    (phase.cfg.out_dir / "summary.json").write_text(json.dumps({"updates": updates}))


def _checkpoint(phase, name: str = "ckpt-00000004"):
    path = phase.cfg.out_dir / "checkpoints" / name
    path.mkdir(parents=True)
    (path / STATE_NAME).write_text("{}")
    return path


def test_resume_continues_in_the_first_unfinished_phase(tmp_path):
    a, b, c = chain(from_dict({**BASE, "run_dir": str(tmp_path), "phases": [{"name": n} for n in "abc"]}))
    assert resume_point([a, b, c], None) == (0, 0)
    assert resume_point([a, b, c], "auto") == (0, 0)
    _finished(a, 7)
    assert resume_point([a, b, c], "auto") == (1, 7)
    _finished(b, 5)
    assert resume_point([a, b, c], "auto") == (2, 12)
    _finished(c, 3)
    assert resume_point([a, b, c], "auto") == (2, 12)  # the last phase runs again (re-exports)
    # An explicit checkpoint continues in the phase that holds it.
    assert resume_point([a, b, c], str(_checkpoint(b))) == (1, 7)


@pytest.mark.slow
def test_phases_in_distrain_train_and_resume(tmp_path, digits):
    phases = [{"name": "pre", "schedule": {"epochs": 1}},
              # LR 0: the parameters stay where the first phase left them, so the test can see where it started.
              {"name": "probe", "schedule": {"epochs": 1, "warmup_epochs": 0}, "optim": {"lr": 0.0}}]
    cfg = recipe(tmp_path, digits, phases=phases, train={"log_every": 5})
    proc = checked(distrain(["train", cfg], cwd=tmp_path))
    run = tmp_path / "run"
    assert "done pre phase" in proc.stdout and "done probe phase" in proc.stdout
    pre, probe = load_file(run / "pre" / "model.safetensors"), load_file(run / "probe" / "model.safetensors")
    params = [k for k in pre if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert all(torch.equal(pre[k], probe[k]) for k in params)
    pre_summary = json.loads((run / "pre" / "summary.json").read_text())
    # One W&B run for the chain, each phase under its own keys, steps increasing across phases.
    (wandb_run,) = read_offline_runs(run)
    steps = {p: [r["_step"] for r in wandb_run["history"] if f"{p}/train/loss" in r] for p in ("pre", "probe")}
    assert steps["pre"] and steps["probe"] and max(steps["pre"]) < min(steps["probe"])
    assert min(steps["probe"]) > pre_summary["updates"]

    # The probe phase lost its checkpoints: --resume auto runs it again, and not the finished first phase.
    pre_events = len(read_jsonl(run / "pre" / "metrics.jsonl"))
    shutil.rmtree(run / "probe")
    proc = checked(distrain(["train", cfg, "--resume", "auto"], cwd=tmp_path))
    assert "done pre phase" not in proc.stdout and "done probe phase" in proc.stdout
    assert len(read_jsonl(run / "pre" / "metrics.jsonl")) == pre_events
    assert (run / "probe" / "model.safetensors").is_file()
