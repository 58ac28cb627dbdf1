"""Per-class eval metrics: the confusion matrix, balanced top-1 and the worst class, on 1 and 2 ranks;
the per-eval confusion files and `distrain eval --confusion`."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import checked, distrain, image_bytes
from PIL import Image
from torch import nn

from distrain.data.device import ToDevice
from distrain.engine.evaluate import balanced_metrics, class_recalls, evaluate
from distrain.track.confusion import confusion_record, plot_confusion


class LookUp(nn.Module):
    """Logits looked up by the sample id that each image's first pixel carries (mean 0, std 1)."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.table[(images[:, 0, 0, 0] * 255).round().long()]


def batches(labels: list[int], size: int) -> list[dict]:
    """Eval batches of ``size`` whose image k (over all batches) carries id k; label -1 is padding."""
    images = torch.arange(len(labels), dtype=torch.uint8)[:, None, None, None].expand(-1, 3, 2, 2)
    y = torch.tensor(labels)
    return [{"image": images[k:k + size], "label": y[k:k + size], "bad": []} for k in range(0, len(labels), size)]


def run_eval(table: torch.Tensor, labels: list[int], size: int = 4):
    from accelerate import Accelerator

    to_device = ToDevice([0.0] * 3, [1.0] * 3, torch.device("cpu"), False)
    return evaluate(LookUp(table), batches(labels, size), to_device, Accelerator(cpu=True))


# Four classes, class 3 absent from the eval set. Class 0: 3 of 4 right (one taken for class 1);
# class 1: 1 of 2 (one taken for class 2); class 2: 3 of 3. The last three rows are padding, which
# the model calls class 3.
LABELS = [0, 0, 0, 0, 1, 1, 2, 2, 2, -1, -1, -1]
PREDICTED = [0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3]
CONFUSION = [[3, 1, 0, 0], [0, 1, 1, 0], [0, 0, 3, 0], [0, 0, 0, 0]]


def test_confusion_balanced_and_worst_against_a_hand_count():
    logits = 4 * F.one_hot(torch.tensor(PREDICTED), 4).float()
    m = run_eval(logits, LABELS)
    assert m.confusion.tolist() == CONFUSION and m.confusion.dtype == torch.int64
    assert m["eval/samples"] == 9 and m["eval/top1"] == pytest.approx(100 * 7 / 9)
    assert m["eval/balanced_top1"] == pytest.approx((75 + 50 + 100) / 3)  # class 3 (absent) left out
    assert m["eval/worst_class_top1"] == pytest.approx(50) and m["eval/worst_class"] == 1
    assert type(m["eval/worst_class"]) is int
    assert m["eval/loss"] == pytest.approx(F.cross_entropy(logits[:9], torch.tensor(LABELS[:9])).item(), rel=1e-6)
    assert "confusion" not in m  # the matrix is beside the metrics, not among them (metrics.jsonl stays short)


def test_padding_rows_count_nowhere():
    logits = 4 * F.one_hot(torch.tensor(PREDICTED), 4).float()
    real = run_eval(logits, LABELS[:9], size=9)
    # Other batch boundaries, a batch of padding alone: the same sums.
    padded = run_eval(torch.cat([logits, logits[-3:]]), LABELS + [-1] * 3, size=3)
    assert padded.confusion.tolist() == real.confusion.tolist() == CONFUSION
    assert padded.pop("eval/loss") == pytest.approx(real.pop("eval/loss"), rel=1e-6)  # other summation order
    assert padded == real


def test_the_confusion_takes_the_same_top1_as_the_hits_even_on_ties():
    g = torch.Generator().manual_seed(0)
    logits = torch.randint(0, 3, (40, 6), generator=g).float()  # many tied maxima
    labels = torch.randint(0, 6, (40,), generator=g).tolist()
    m = run_eval(logits, labels, size=7)
    assert m.confusion.trace().item() == round(m["eval/top1"] * 40 / 100)
    assert m.confusion.sum(dim=1).tolist() == [labels.count(c) for c in range(6)]


def test_balanced_metrics_edge_cases():
    assert class_recalls(torch.tensor([[1, 1], [0, 0]])) == [50.0, None]
    # Ties for the worst class go to the lowest index.
    assert balanced_metrics(torch.tensor([[1, 1, 0], [0, 2, 0], [0, 1, 1]])) == {
        "eval/balanced_top1": pytest.approx(100 * 2 / 3), "eval/worst_class_top1": 50.0, "eval/worst_class": 0}
    assert balanced_metrics(torch.zeros(2, 2, dtype=torch.long)) == {
        "eval/balanced_top1": 0.0, "eval/worst_class_top1": 0.0, "eval/worst_class": -1}
    record = confusion_record(torch.tensor(CONFUSION), ["cat", "dog"])
    assert record == {"classes": ["cat", "dog", "2", "3"], "per_class_top1": [75.0, 50.0, 100.0, None],
                      "confusion": CONFUSION}


def test_eval_line_shows_balanced_top1_and_the_worst_class():
    from distrain.cli import _format_eval

    m = {"eval/top1": 80.0, "eval/top5": 99.0, "eval/loss": 0.5, "eval/samples": 9, "eval/balanced_top1": 75.0,
         "eval/worst_class_top1": 50.0, "eval/worst_class": 1, "classes": ["cat", "dog"], "checkpoint": "c"}
    line = _format_eval(m)
    assert "top-1 80.00%  balanced top-1 75.00%" in line and "worst class dog 50.00%" in line


@pytest.mark.parametrize("classes", [4, 200])
def test_confusion_png_small_and_large(tmp_path, classes):
    g = torch.Generator().manual_seed(0)
    counts = torch.randint(0, 3, (classes, classes), generator=g) + 20 * torch.eye(classes, dtype=torch.long)
    counts[1] = 0  # an absent class: a grey row, no division by zero
    out = plot_confusion(counts, ["cat", "dog"], tmp_path / "sub" / "c.png", title="t")
    with Image.open(out) as image:
        assert image.format == "PNG" and min(image.size) >= classes  # a pixel per cell at least


# --- a real run dir, evaluated by `distrain eval` on 1 and 2 processes --------------------------

NAMES = ["cat", "dog", "emu", "yak"]
EVAL_PER_CLASS = [13, 6, 3, 1]  # imbalanced: balanced top-1 is not top-1


def write_shards(out, labels: list[int], per_shard: int) -> None:
    import webdataset as wds

    from distrain.data.index import write_index

    out.mkdir(parents=True)
    shards = []
    for s, start in enumerate(range(0, len(labels), per_shard)):
        name = f"shard-{s:02d}.tar"
        with wds.TarWriter(str(out / name)) as tw:
            for n in range(start, min(start + per_shard, len(labels))):
                tw.write({"__key__": f"s{n:05d}", "png": image_bytes(37 * n + 11 * labels[n]),
                          "cls": str(labels[n]).encode()})
        shards.append((name, min(per_shard, len(labels) - start)))
    write_index(out, shards, NAMES)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """Two updates of ResNet-20 on 64 tiny images, then its eval on 23 imbalanced ones."""
    tmp = tmp_path_factory.mktemp("balanced")
    write_shards(tmp / "train", [n % 4 for n in range(64)], 32)
    write_shards(tmp / "eval", [c for c, k in enumerate(EVAL_PER_CLASS) for _ in range(k)], 9)
    doc = {
        "name": "b", "run_dir": str(tmp / "run"),
        "data": {"train": str(tmp / "train"), "eval": str(tmp / "eval"), "train_crop": 16, "eval_resize": 16,
                 "eval_crop": 16, "hflip": False, "workers": 1, "mean": [0.5] * 3, "std": [0.5] * 3},
        "model": {"name": "cifar_resnet20"},
        "batch": {"per_device": 8},
        "optim": {"lr": 0.01, "base_batch": 8},  # small: the model still tells images apart
        "schedule": {"epochs": 1, "warmup_epochs": 0},
        "train": {"max_updates": 2, "log_every": 1},
        "eval": {"batch_size": 4},  # 23 samples: 3 batches a rank on 2 ranks, padded
        "logging": {"wandb": False, "progress": False},
    }
    (tmp / "recipe.yaml").write_text(yaml.safe_dump(doc))
    checked(distrain(["train", str(tmp / "recipe.yaml")], cwd=tmp))
    return tmp


def last_json(proc) -> dict:
    return json.loads(checked(proc).stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.dist
def test_per_class_metrics_are_the_same_on_one_and_two_ranks(small_run):
    tmp = small_run
    summary = json.loads((tmp / "run" / "summary.json").read_text())
    # The training loop wrote the eval's matrix (rank 0), named by its update.
    logged = json.loads((tmp / "run" / "eval" / "confusion-update-00000002.json").read_text())
    assert [p.name for p in (tmp / "run" / "eval").iterdir()] == ["confusion-update-00000002.json"]
    assert logged["classes"] == NAMES and logged["step"] == 2
    assert [sum(row) for row in logged["confusion"]] == EVAL_PER_CLASS
    assert sum(any(row[c] for row in logged["confusion"]) for c in range(4)) >= 2  # not one class for every image
    assert logged["eval/balanced_top1"] == summary["eval/balanced_top1"]

    one = last_json(distrain(["eval", "run", "--json", "--confusion", "c.png"], cwd=tmp))
    two = last_json(distrain(["eval", "run", "--json"], cwd=tmp, nproc=2))
    keys = ["eval/samples", "eval/top1", "eval/balanced_top1", "eval/worst_class_top1", "eval/worst_class",
            "confusion", "per_class_top1", "classes"]
    assert {k: one[k] for k in keys} == {k: two[k] for k in keys} == {k: logged[k] for k in keys}
    assert one["eval/samples"] == 23
    recalls = [100 * row[c] / sum(row) for c, row in enumerate(one["confusion"])]
    assert one["eval/balanced_top1"] == pytest.approx(sum(recalls) / 4)
    assert one["eval/worst_class_top1"] == pytest.approx(min(recalls))
    with Image.open(tmp / "c.png") as image:
        assert image.format == "PNG"
