"""Label propagation as a phase of `distrain train` on partially labeled digits (100 of 1,437 labels):
after a supervised phase on the labeled ones, pseudo-labels each round; on 2 ranks, the same first
propagation as 1 rank and an exact resume mid-epoch and at a propagation."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import checked, distrain, read_jsonl
from safetensors.torch import load_file
from test_train import recipe

from distrain.data.writer import write_digits


@pytest.fixture(scope="module")
def partial(tmp_path_factory):
    """Digits with 10 labels per class: train (1,437, 100 labeled), labeled (100), test (360)."""
    out = tmp_path_factory.mktemp("partial")
    write_digits(out, samples_per_shard=300, progress=False, labeled_per_class=10)
    return out


def _recipe(where, partial, **sections):
    sections["data"] = {"train": str(partial / "train"), **sections.get("data", {})}
    sections.setdefault("batch", {"per_device": 32, "accumulation": 1})
    sections.setdefault("train", {"log_every": 1, "label_smoothing": 0.0})
    return recipe(where, partial, **sections)


def _lp_rounds(log):
    return [e for e in log if "lp/unlabeled" in e]


def _targets(run_dir):
    newest = sorted((run_dir / "checkpoints").glob("update-*"))[-1]
    return load_file(newest / "lp_targets.safetensors")


def test_a_supervised_phase_on_unlabeled_samples_is_refused_with_the_way_out(tmp_path, partial):
    proc = distrain(["train", _recipe(tmp_path, partial)], cwd=tmp_path)
    assert proc.returncode != 0
    assert "data.train: 1337 of the 1437 samples" in proc.stderr and "labeled/ split" in proc.stderr


@pytest.mark.slow
def test_propagation_after_a_supervised_phase_labels_the_unlabeled_samples(tmp_path, partial):
    cfg = _recipe(tmp_path, partial, data={"train": str(partial / "labeled")}, schedule={"epochs": 15},
                  eval={"every_epochs": 15, "batch_size": 120}, checkpoint={"every_epochs": 15, "keep_last": 1},
                  phases=[{"name": "sup"},
                          {"name": "lp", "data": {"train": str(partial / "train")},
                           "lp": {"enabled": True, "k": 20}, "schedule": {"epochs": 2},
                           "eval": {"every_epochs": 1}, "checkpoint": {"every_epochs": 1}}])
    checked(distrain(["train", cfg], cwd=tmp_path))
    rounds = _lp_rounds(read_jsonl(tmp_path / "run" / "lp" / "metrics.jsonl"))
    assert [(r["epoch"], r["lp/labeled"], r["lp/unlabeled"]) for r in rounds] == [(0, 100, 1337), (1, 100, 1337)]
    # the supervised phase's features already put most unlabeled digits in their class (chance: 10%)
    assert all(r["lp/pseudo_top1"] > 75 for r in rounds), rounds
    targets = _targets(tmp_path / "run" / "lp")
    keys = bytes(targets["keys"].numpy()).decode().split("\n")
    assert len(keys) == len(set(keys)) == 1437
    labeled = json.loads((partial / "labeled" / "index.json").read_text())
    assert sum(s["samples"] for s in labeled["shards"]) == 100
    assert (targets["weights"] == 1).sum() >= 100 and targets["made_at"].tolist() == [1]
    summary = json.loads((tmp_path / "run" / "lp" / "summary.json").read_text())
    assert summary["eval/top1"] > 80


@pytest.mark.slow
@pytest.mark.dist
def test_two_ranks_propagate_as_one_and_resume_exactly(tmp_path, partial):
    def run(where, nproc, *args, **sections):
        where.mkdir(exist_ok=True)
        cfg = _recipe(where, partial, lp={"enabled": True, "k": 20}, schedule={"epochs": 2},
                      checkpoint={"every_epochs": 1, "keep_last": 4}, distributed={"timeout_s": 120}, **sections)
        checked(distrain(["train", cfg, *args], cwd=where, nproc=nproc))
        return read_jsonl(where / "run" / "metrics.jsonl")

    # The first propagation, from the seeded init: features split over 2 ranks, the graph's rows and
    # the classes' diffusions too, give 1 rank's pseudo-labels.
    one = run(tmp_path / "one", 1, "train.max_updates=1", batch={"per_device": 64, "accumulation": 1})
    # The 2-rank runs also oversample the labeled samples to a fifth of each epoch: 1,337 unlabeled
    # plus 330 labeled copies = 1,667 samples, 26 updates of 64 per epoch.
    share = "lp.labeled_share=0.2"
    two = run(tmp_path / "two", 2, share)
    first = [_lp_rounds(log)[0] for log in (one, two)]
    assert first[0]["lp/pseudo_top1"] == first[1]["lp/pseudo_top1"]
    assert first[0]["lp/mean_weight"] == pytest.approx(first[1]["lp/mean_weight"], rel=1e-5)
    made = [load_file(sorted((d / "run" / "checkpoints").glob("update-*"))[0] / "lp_targets.safetensors")
            for d in (tmp_path / "one", tmp_path / "two")]
    assert torch.equal(made[0]["keys"], made[1]["keys"]) and torch.equal(made[0]["labels"], made[1]["labels"])
    torch.testing.assert_close(made[0]["weights"], made[1]["weights"], rtol=1e-5, atol=1e-6)
    assert [r["epoch"] for r in _lp_rounds(two)] == [0, 1]
    a, b = json.loads((tmp_path / "two" / "run" / "summary.json").read_text())["replica_fingerprints"]
    assert a == b  # the pseudo-labels in force are part of the fingerprints

    # Stopped at the end of epoch 0 (the next propagation is due and runs on resume, from the
    # checkpoint's weights), then mid-epoch 1 (the targets in force come from the checkpoint).
    where = tmp_path / "resumed"
    run(where, 2, share, "train.max_updates=26")
    run(where, 2, share, "--resume", "auto", "train.max_updates=35")
    resumed = run(where, 2, share, "--resume", "auto")
    losses = [{e["step"]: e["train/loss"] for e in log if "train/loss" in e} for log in (two, resumed)]
    assert max(losses[0]) == max(losses[1]) == 52
    assert all(losses[1][s] == losses[0][s] for s in range(27, 53))
    rounds = _lp_rounds(resumed)
    assert [r["epoch"] for r in rounds] == [0, 1]  # epoch 1's made once, by the first resume
    assert rounds[1]["lp/pseudo_top1"] == _lp_rounds(two)[1]["lp/pseudo_top1"]
    final = [load_file(d / "run" / "model.safetensors") for d in (tmp_path / "two", where)]
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])
