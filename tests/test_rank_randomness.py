"""Per-rank randomness: ranks draw differently, a resumed run draws as the uninterrupted one, and a
rank's draws do not depend on how many other ranks there are (issue: one lambda for a 256-GPU batch)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import checked, distrain, read_jsonl
from test_train import recipe

from distrain.parallel.rng import Owner, micro_batch_seed, seed_layers


def test_seeds_differ_by_rank_update_micro_batch_and_owner():
    base = micro_batch_seed(0, 0, 10, 0, Owner.MIX)
    others = [micro_batch_seed(0, 1, 10, 0, Owner.MIX), micro_batch_seed(0, 0, 11, 0, Owner.MIX),
              micro_batch_seed(0, 0, 10, 1, Owner.MIX), micro_batch_seed(0, 0, 10, 0, Owner.ERASE),
              micro_batch_seed(1, 0, 10, 0, Owner.MIX), micro_batch_seed(2**40, 0, 10, 0, Owner.MIX)]
    assert len({base, *others}) == 7
    assert base == micro_batch_seed(0, 0, 10, 0, Owner.MIX) and 0 <= base < 2**63
    # A later phase (FixRes, a fine-tune) counts its updates from 0 again but draws anew; the first
    # phase draws what a run without phases draws.
    assert base == micro_batch_seed(0, 0, 10, 0, Owner.MIX, phase=0)
    assert len({base, micro_batch_seed(0, 0, 10, 0, Owner.MIX, phase=1), micro_batch_seed(0, 0, 10, 0, Owner.MIX, phase=2)}) == 3


def test_seed_layers_makes_dropout_masks_a_function_of_the_seed():
    drop = torch.nn.Dropout(0.5)
    x = torch.ones(1000)
    seed_layers(torch.device("cpu"), 5)
    a = drop(x)
    torch.rand(7)  # anything drawn in between does not matter once the layer is reseeded
    seed_layers(torch.device("cpu"), 5)
    assert torch.equal(drop(x), a)
    seed_layers(torch.device("cpu"), 6)
    assert not torch.equal(drop(x), a)


def _draws(run_dir, rank: int) -> dict[tuple[int, int], dict]:
    return {(r["update"], r["micro"]): r for r in read_jsonl(run_dir / "draws" / f"rank{rank}.jsonl")}


# EMA on a BN model too: the same runs check that every rank ends with rank 0's buffers.
AUGMENT = {"mix": {"mixup_alpha": 0.4, "cutmix_alpha": 1.0, "prob": 1.0, "switch_prob": 0.5},
           "ema": {"decay": 0.9, "every": 1},
           "logging": {"draws": True, "wandb": False, "progress": False}}


def _recipe(tmp, digits, name: str, max_updates: int) -> str:
    (tmp / name).mkdir()
    return recipe(tmp / name, digits, data={"random_erasing": 0.5, "workers": 0}, train={"max_updates": max_updates},
                  distributed={"timeout_s": 120}, eval={"every_epochs": 10}, **AUGMENT)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, digits):
    tmp = tmp_path_factory.mktemp("rng")
    full = _recipe(tmp, digits, "full", 6)
    checked(distrain(["train", full], cwd=tmp, nproc=2))
    stopped = _recipe(tmp, digits, "stopped", 3)
    checked(distrain(["train", stopped], cwd=tmp, nproc=2))
    (tmp / "stopped-summary.json").write_text((tmp / "stopped" / "run" / "summary.json").read_text())
    checked(distrain(["train", stopped, "--resume", "auto", "train.max_updates=6"], cwd=tmp, nproc=2))
    single = _recipe(tmp, digits, "single", 6)
    checked(distrain(["train", single], cwd=tmp, nproc=1))
    return {name: tmp / name / "run" for name in ("full", "stopped", "single")}


@pytest.mark.dist
@pytest.mark.slow
def test_ranks_draw_different_lambdas_boxes_and_erasures(runs):
    r0, r1 = _draws(runs["full"], 0), _draws(runs["full"], 1)
    assert r0.keys() == r1.keys() and len(r0) == 6 * 2  # 6 updates x accumulation 2
    for at in r0:
        assert r0[at]["mix"] is not None and r1[at]["mix"] is not None
        assert r0[at]["mix"] != r1[at]["mix"], at  # lambda (and box) differ between ranks
    assert sum(r0[at]["erased"] != r1[at]["erased"] for at in r0) >= len(r0) - 1
    kinds = {r["mix"]["kind"] for r in r0.values()}
    assert kinds == {"mixup", "cutmix"}


@pytest.mark.dist
@pytest.mark.slow
def test_resumed_run_draws_and_mixes_exactly_as_the_uninterrupted_one(runs):
    for rank in (0, 1):
        full, resumed = _draws(runs["full"], rank), _draws(runs["stopped"], rank)
        assert full.keys() == resumed.keys()
        for at in full:
            # Same draws, and the same augmented tensors and targets (their checksums).
            assert resumed[at] == full[at], (rank, at)
        assert any(u >= 3 for u, _ in resumed)  # the part after the resume is compared too


@pytest.mark.dist
@pytest.mark.slow
def test_a_ranks_draws_do_not_depend_on_the_world_size(runs):
    one, two = _draws(runs["single"], 0), _draws(runs["full"], 0)
    assert one.keys() == two.keys()
    for at in one:
        assert one[at]["mix"] == two[at]["mix"] and one[at]["erased"] == two[at]["erased"], at


@pytest.mark.dist
@pytest.mark.slow
def test_every_rank_ends_with_rank0s_buffers_raw_and_ema_and_a_resume_ends_alike(runs):
    """BN statistics (and so the EMA's averages of them) differ per rank between DDP's broadcasts;
    at the end of a run (its evals, saves and export all apply the rule) every rank must hold rank
    0's raw and EMA buffers, for a run stopped early and for one resumed from it, and the resumed
    run must end where the uninterrupted one does, buffers included."""
    stopped = json.loads((runs["full"].parent.parent / "stopped-summary.json").read_text())
    full, resumed = (json.loads((runs[n] / "summary.json").read_text()) for n in ("full", "stopped"))
    for summary in (stopped, full, resumed):
        raw_and_ema = summary["replica_fingerprints"]  # parameters + buffers, then the EMA's
        assert raw_and_ema[0] == raw_and_ema[1], summary["run_dir"]
    assert full["replica_fingerprints"] == resumed["replica_fingerprints"]
    assert full["eval/ema_top1"] == resumed["eval/ema_top1"]
