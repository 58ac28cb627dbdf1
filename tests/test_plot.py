"""``distrain plot``: curves of a run dir's metrics.jsonl as a PNG, from a hand-written log (no training)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from PIL import Image

from distrain.cli import main
from distrain.errors import DistrainError
from distrain.track.plot import collect_series, plot_run, read_events, updates_per_epoch

UPDATES_PER_EPOCH = 44
STRIDE = 2  # updates between train events


def _train_event(step: int, loss_shift: float = 0.0) -> dict:
    epoch = (step - 1) // UPDATES_PER_EPOCH
    return {
        "step": step,
        "epoch": epoch,
        "train/loss": 2.3 * math.exp(-step / 150) + 0.05 + loss_shift,
        "train/lr": 0.1 * 0.5 * (1 + math.cos(math.pi * step / 880)),
        "train/images_per_s": 300.0,
        "train/grad_norm": 1.2,
    }


def _eval_event(epoch: int, top1_shift: float = 0.0) -> dict:
    top1 = 100 - 60 * math.exp(-epoch / 3) + top1_shift
    return {
        "step": epoch * UPDATES_PER_EPOCH,
        "epoch": epoch,
        "eval/loss": 1.5 * math.exp(-epoch / 4) + 0.1,
        "eval/top1": top1,
        "eval/top5": min(100.0, top1 + 5),
        "eval/ema_top1": top1 - 1,
        "eval/samples": 360,
    }


def _write(path: Path, events: list[dict], tail: str = "") -> None:
    with path.open("a") as f:
        for e in events:
            f.write(json.dumps(e) + "\n")
        f.write(tail)


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """A 20-epoch run that crashed at update 500 mid-line and resumed from its epoch-10 checkpoint.

    The resumed run logs updates 442..500 again (loss 0.5 lower, so the tests can tell them apart).
    """
    run = tmp_path / "runs" / "resnet-demo"
    run.mkdir(parents=True)
    log = run / "metrics.jsonl"
    first = []
    for step in range(STRIDE, 501, STRIDE):
        first.append(_train_event(step))
        if step % UPDATES_PER_EPOCH == 0:
            first.append(_eval_event(step // UPDATES_PER_EPOCH))
    first.append({"step": 300, "epoch": 6, "data/skipped": 1, "train/skipped_updates": 0})
    _write(log, first, tail='{"step": 502, "epoch": 11, "train/lo')  # the crash cut this line short
    second = []
    for step in range(442, 20 * UPDATES_PER_EPOCH + 1, STRIDE):
        second.append(_train_event(step, loss_shift=-0.5 if step <= 500 else 0.0))
        if step % UPDATES_PER_EPOCH == 0:
            second.append(_eval_event(step // UPDATES_PER_EPOCH))
    _write(log, second)
    return run


def test_plot_run_writes_a_png(run: Path, capsys) -> None:
    path = plot_run(run)
    assert path == run / "curves.png"
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.width > 400 and im.height > 400
    # the cut line is skipped with a warning, not a failure
    assert "skipped 1 unreadable line" in capsys.readouterr().err


def test_collect_series_later_line_wins_on_repeated_steps(run: Path) -> None:
    events = read_events(run)
    assert len(events) > 450
    steps, losses = collect_series(events)["train/loss"]
    assert steps == sorted(set(steps)), "one point per step, in order"
    assert steps[0] == 2 and steps[-1] == 880
    by_step = dict(zip(steps, losses))
    assert by_step[470] == pytest.approx(_train_event(470)["train/loss"] - 0.5)  # resumed run's value
    assert by_step[440] == pytest.approx(_train_event(440)["train/loss"])  # logged once, before the crash
    assert by_step[502] == pytest.approx(_train_event(502)["train/loss"])  # the cut event's step, rewritten
    # the resumed run's first event shares a line with the cut one and is still read
    assert by_step[442] == pytest.approx(_train_event(442)["train/loss"] - 0.5)


def test_collect_series_minimal() -> None:
    events = [
        {"step": 2, "epoch": 0, "train/loss": 1.0, "flag": True, "note": "x"},
        {"step": 1, "epoch": 0, "train/loss": 3.0},
        {"step": 2, "epoch": 0, "train/loss": 0.5},
    ]
    series = collect_series(events)
    assert series == {"train/loss": ([1, 2], [3.0, 0.5])}


def test_updates_per_epoch(run: Path) -> None:
    assert updates_per_epoch(read_events(run)) == UPDATES_PER_EPOCH
    assert updates_per_epoch([_train_event(10)]) is None


def test_cli_plot(run: Path, tmp_path: Path, capsys) -> None:
    assert main(["plot", str(run)]) == 0
    assert capsys.readouterr().out.strip() == str(run / "curves.png")
    out = tmp_path / "figs" / "demo.png"
    assert main(["plot", str(run), "--out", str(out)]) == 0
    assert out.is_file() and capsys.readouterr().out.strip() == str(out)


def test_panels_without_data_still_plot(tmp_path: Path) -> None:
    # only train loss, as early in a run before the first eval; the LR and accuracy panels say so
    run = tmp_path / "early"
    run.mkdir()
    _write(run / "metrics.jsonl", [{"step": s, "epoch": 0, "train/loss": 2.0 / s} for s in (1, 2, 3)])
    with Image.open(plot_run(run)) as im:
        assert im.format == "PNG"


@pytest.mark.parametrize("case", ["no-run-dir", "no-metrics", "empty-metrics"])
def test_cli_errors(tmp_path: Path, capsys, case: str) -> None:
    run = tmp_path / "run"
    if case != "no-run-dir":
        run.mkdir()
    if case == "empty-metrics":
        (run / "metrics.jsonl").write_text("\n")
    assert main(["plot", str(run)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("distrain: error: ")
    assert str(run) in err and (case == "no-run-dir" or "metrics.jsonl" in err)
    assert captured.out == ""
    with pytest.raises(DistrainError):
        plot_run(run)
