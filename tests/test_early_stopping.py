"""Early stopping: when the state machine stops, and that a requeued run keeps its count."""

from __future__ import annotations

import json

import pytest

from distrain.config import Config
from distrain.errors import DistrainError
from distrain.tricks.early_stopping import EarlyStopping, check_config


def _feed(es: EarlyStopping, values: list[float], metric: str = "eval/top1", first_epoch: int = 1) -> list[bool]:
    return [es.update({metric: v, "eval/samples": 360}, epoch=e, update=10 * e)
            for e, v in enumerate(values, start=first_epoch)]


def test_plateau_stops_after_exactly_patience_evaluations():
    es = EarlyStopping("eval/top1", "max", patience=3, min_delta=0.0)
    assert _feed(es, [50, 60, 60, 59, 58]) == [False, False, False, False, True]
    assert (es.best, es.best_epoch, es.best_update) == (60, 2, 20)
    assert es.reason == ("early stop: eval/top1 did not improve by more than 0 for 3 evaluations "
                         "(best 60 at epoch 2, update 20)")


def test_an_improvement_resets_the_count():
    es = EarlyStopping("eval/top1", "max", patience=2, min_delta=0.0)
    assert _feed(es, [50, 49, 51, 50, 52, 51, 50]) == [False, False, False, False, False, False, True]
    assert es.best_epoch == 5 and es.reason.endswith("(best 52 at epoch 5, update 50)")


def test_min_delta_is_strictly_greater():
    es = EarlyStopping("eval/top1", "max", patience=2, min_delta=0.5)
    # +0.5 is not more than min_delta, and does not move the best: slow drifts still stop the run.
    assert _feed(es, [50, 50.5, 51.0, 51.6]) == [False, False, False, False]
    assert es.best == 51.6 and es.evals_since_best == 0
    assert _feed(es, [52.1, 52.1], first_epoch=5) == [False, True]
    assert "did not improve by more than 0.5 for 2 evaluations (best 51.6 at epoch 4" in es.reason


def test_mode_min():
    es = EarlyStopping("eval/loss", "min", patience=2, min_delta=0.01)
    assert _feed(es, [1.0, 0.8, 0.795, 0.9], metric="eval/loss") == [False, False, False, True]
    assert es.best == 0.8


def test_non_finite_values_never_improve():
    es = EarlyStopping("eval/loss", "min", patience=2, min_delta=0.0)
    assert _feed(es, [float("nan"), 1.0, float("nan"), float("inf")], metric="eval/loss") == [False] * 3 + [True]
    assert es.best == 1.0


def test_patience_zero_is_off():
    es = EarlyStopping("eval/top1", "max", patience=0, min_delta=0.0)
    assert not any(_feed(es, [50] * 20)) and es.reason == ""
    assert es.best == 50  # still tracked


def test_a_requeued_run_continues_the_count():
    es = EarlyStopping("eval/top1", "max", patience=3, min_delta=0.0)
    _feed(es, [50, 60, 55, 54])  # two evaluations since the best
    saved = json.loads(json.dumps(es.state_dict()))  # as trainer_state.json holds it
    resumed = EarlyStopping("eval/top1", "max", patience=3, min_delta=0.0)
    resumed.load_state_dict(saved)
    assert _feed(resumed, [59], first_epoch=5) == [True]
    assert resumed.reason.endswith("for 3 evaluations (best 60 at epoch 2, update 20)")
    # Another metric (or none saved: a checkpoint from before early stopping) starts afresh.
    other = EarlyStopping("eval/loss", "min", patience=3, min_delta=0.0)
    other.load_state_dict(saved)
    assert other.best is None and other.evals_since_best == 0
    EarlyStopping("eval/top1", "max", patience=3, min_delta=0.0).load_state_dict({})


def test_state_of_a_stopped_run_says_so_after_loading():
    es = EarlyStopping("eval/top1", "max", patience=1, min_delta=0.0)
    _feed(es, [50, 40])
    resumed = EarlyStopping("eval/top1", "max", patience=1, min_delta=0.0)
    resumed.load_state_dict(es.state_dict())
    assert resumed.stopped and resumed.reason == es.reason


def test_a_metric_missing_from_the_evaluation():
    es = EarlyStopping("eval/ema_top1", "max", patience=3, min_delta=0.0)
    with pytest.raises(DistrainError, match=r"^early_stopping.metric: 'eval/ema_top1' is not among the eval metrics "
                                            r"\(eval/loss, eval/top1\)$"):
        es.update({"eval/top1": 50.0, "eval/loss": 1.0}, epoch=1, update=10)


def _config(**early_stopping) -> Config:
    cfg = Config()
    cfg.data.eval = "shards/test"
    for key, value in {"patience": 3, **early_stopping}.items():
        setattr(cfg.early_stopping, key, value)
    return cfg


ALL = "eval/loss, eval/top1, eval/top5, eval/balanced_top1, eval/worst_class_top1"


@pytest.mark.parametrize("settings, message", [
    ({"metric": "train/loss", "mode": "min"},
     "early_stopping.metric: 'train/loss' is not an eval metric (one of " + ALL + ")"),
    ({"metric": "eval/top2"}, "early_stopping.metric: this run never logs 'eval/top2' (it logs " + ALL + ")"),
    ({"metric": "eval/ema_top1"},
     "early_stopping.metric: this run never logs 'eval/ema_top1' (it logs " + ALL + "; eval/ema_* need ema.decay > 0)"),
    ({"metric": "eval/loss"},
     "early_stopping.mode: max for eval/loss, which improves downwards; set early_stopping.mode=min"),
    ({"mode": "min"}, "early_stopping.mode: min for eval/top1, which improves upwards; set early_stopping.mode=max"),
    ({"patience": -1}, "early_stopping.patience: -1 must be >= 0 (0 is off)"),
    ({"min_delta": -0.1}, "early_stopping.min_delta: -0.1 must be >= 0"),
])
def test_config_mistakes_name_the_key(settings, message):
    with pytest.raises(DistrainError) as error:
        check_config(_config(**settings))
    assert str(error.value) == message


def test_config_without_eval_set_and_what_passes():
    cfg = _config()
    cfg.data.eval = ""
    with pytest.raises(DistrainError, match="^early_stopping.patience: needs evaluations, but data.eval is empty$"):
        check_config(cfg)
    check_config(_config(metric="eval/loss", mode="min"))
    ema = _config(metric="eval/ema_top1")
    ema.ema.decay = 0.999
    check_config(ema)
    off = _config(patience=0, metric="anything")
    off.data.eval = ""
    check_config(off)  # off: nothing to check


def test_restore_best_needs_a_kept_checkpoint_at_every_evaluation():
    cfg = _config(restore_best=True)
    cfg.eval.every_epochs, cfg.checkpoint.every_epochs = 3, 2
    with pytest.raises(DistrainError, match=r"^early_stopping.restore_best: needs a checkpoint at every evaluation"):
        check_config(cfg)
    cfg.checkpoint.every_epochs = 1
    check_config(cfg)
    cfg.checkpoint.keep_best = False
    with pytest.raises(DistrainError, match="checkpoint.keep_best=true"):
        check_config(cfg)


@pytest.mark.slow
def test_in_distrain_train_a_requeued_run_keeps_its_patience_and_exports_the_best(tmp_path, digits):
    import torch
    from conftest import checked, distrain
    from safetensors.torch import load_file
    from test_train import recipe

    # min_delta 100 (points of top-1): only the first evaluation ever counts as an improvement.
    cfg = recipe(tmp_path, digits, data={"train_crop": 8, "eval_resize": 8, "eval_crop": 8},
                 batch={"per_device": 32, "accumulation": 1}, schedule={"epochs": 8, "warmup_epochs": 0},
                 early_stopping={"patience": 2, "min_delta": 100, "restore_best": True},
                 train={"log_every": 20, "max_updates": 88})  # 44 updates per epoch: stop after epoch 2
    run = tmp_path / "run"
    first = checked(distrain(["train", cfg], cwd=tmp_path))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epoch"] == 2 and summary["stopped_early"] == ""  # one evaluation without improvement
    assert "early stop" not in first.stdout

    # The requeue: the counter comes back from the checkpoint, so the next evaluation is the second
    # without improvement and the run stops after epoch 3 (a fresh count would run to epoch 5).
    second = checked(distrain(["train", cfg, "--resume", "auto", "train.max_updates=0"], cwd=tmp_path))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epoch"] == 3 and summary["updates"] == 132
    assert summary["stopped_early"].startswith(
        "early stop: eval/top1 did not improve by more than 100 for 2 evaluations (best ")
    assert summary["stopped_early"].endswith("at epoch 1, update 44)")
    assert summary["stopped_early"] in second.stdout.splitlines()[-1]  # the last line says why
    # The export is the best evaluation's weights, from its checkpoint (kept although keep_last is 1).
    best = run / "checkpoints" / "update-00000044"
    assert summary["exported"] == summary["best_checkpoint"] == str(best)
    exported, kept = load_file(run / "model.safetensors"), load_file(best / "model.safetensors")
    assert exported.keys() == kept.keys() and all(torch.equal(exported[k], kept[k]) for k in kept)
