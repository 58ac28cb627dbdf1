"""SimCLR as a phase of `distrain train`: config checks, the backbone export the next phase loads,
a short pretraining that beats random init on the kNN monitor, then a linear probe; 2 ranks."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import checked, distrain, image_bytes, read_jsonl
from safetensors.torch import load_file
from test_train import recipe

from distrain.config import ModelConfig, from_dict, phase_configs
from distrain.engine.selfsup import SSLModel, backbone_weights, strip_classifier
from distrain.errors import DistrainError
from distrain.models import create_model
from distrain.models.pretrained import load_pretrained

SIMCLR = {"method": "simclr", "temperature": 0.2, "proj_hidden": 64, "proj_dim": 32, "knn_k": 20}


@pytest.mark.parametrize("settings, key", [
    ({"mix": {"mixup_alpha": 0.2}}, "mix.mixup_alpha"),
    ({"train": {"label_smoothing": 0.1}}, "train.label_smoothing"),
    ({"data": {"resample": "class_balanced"}}, "data.resample"),
    ({"transfer": {"mode": "linear_probe"}}, "transfer.mode"),
    ({"data": {"policy": "randaugment"}}, "data.policy"),
    ({"ssl": {"temperature": 0}}, "ssl.temperature"),
    ({"ssl": {"color_strength": 3}}, "ssl.color_strength"),
    ({"early_stopping": {"patience": 2}, "data": {"eval": "x"}}, "early_stopping.metric"),
])
def test_what_ssl_cannot_do_is_refused_by_key(settings, key):
    doc = {"ssl": {"method": "simclr", **settings.pop("ssl", {})}, **settings}
    with pytest.raises(DistrainError, match=key.replace(".", r"\.")):
        from_dict(doc)


def test_the_phase_after_ssl_loads_the_backbone_with_a_fresh_classifier():
    cfg = from_dict({"phases": [{"name": "pre", "ssl": {"method": "simclr"}},
                                {"name": "probe", "transfer": {"mode": "linear_probe"}},
                                {"name": "ft"}]})
    pre, probe, ft = phase_configs(cfg)
    assert probe.model.pretrained.endswith("pre") and probe.model.reset_classifier
    assert ft.model.pretrained.endswith("probe") and not ft.model.reset_classifier


def test_the_export_is_the_classifier_network_without_its_classifier():
    net = create_model(ModelConfig(name="cifar_resnet20"), 10)
    names = set(net.state_dict())
    encoder, width = strip_classifier(create_model(ModelConfig(name="cifar_resnet20"), 10))
    model = SSLModel(encoder, width, 64, 32)
    assert model(torch.randn(4, 3, 16, 16)).shape == (4, 32)
    export = backbone_weights(model.state_dict())
    assert set(export) == names - {"fc.weight", "fc.bias"}
    # what the next phase does: load it, the classifier left at its init
    report = load_pretrained(net, _saved(export), reset_classifier=True)
    assert report.reinitialised == ["fc.weight", "fc.bias"]
    torch.testing.assert_close(net.conv1.weight, encoder.conv1.weight)


def _saved(state):
    import tempfile

    from safetensors.torch import save_file

    path = tempfile.mkdtemp() + "/model.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    return path


def _chain(tmp_path, digits, epochs=2, **extra):
    # LR 0.1: at 0.2 (plain SGD, batch 64, no LARS) 2 of 4 seeds ended at or below their random-init
    # kNN (87.5 -> 87.5, 87.5 -> 83.9); at 0.1 all 4 gained 3.9 to 7.2 points (seeds 0-3, 1 thread).
    return recipe(tmp_path, digits, batch={"per_device": 64, "accumulation": 1}, schedule={"epochs": epochs},
                  optim={"lr": 0.1, "base_batch": 64}, train={"log_every": 5, "label_smoothing": 0.0},
                  eval={"every_epochs": epochs, "batch_size": 128}, **extra,
                  phases=[{"name": "pre", "ssl": SIMCLR},
                          {"name": "probe", "transfer": {"mode": "linear_probe"}, "schedule": {"epochs": 1},
                           "eval": {"every_epochs": 1}}])


@pytest.mark.slow
def test_pretraining_beats_random_init_then_a_probe_trains_on_it(tmp_path, digits):
    checked(distrain(["train", _chain(tmp_path, digits)], cwd=tmp_path))
    run = tmp_path / "run"
    knn = [r["eval/knn_top1"] for r in read_jsonl(run / "pre" / "metrics.jsonl") if "eval/knn_top1" in r]
    assert len(knn) == 2  # at random init, then after pretraining
    assert knn[1] > knn[0] + 2, knn
    exported = load_file(run / "pre" / "model.safetensors")
    assert "fc.weight" not in exported and not any(k.startswith("projector.") for k in exported)
    probe = json.loads((run / "probe" / "summary.json").read_text())
    assert probe["eval/top1"] > 40  # a linear classifier on the pretrained features


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.deepspeed
def test_two_ranks_agree_resume_exactly_count_knn_once_and_match_under_zero2_and_3(tmp_path, digits):
    def run(where, nproc, *args, **distributed):
        where.mkdir(exist_ok=True)
        cfg = recipe(where, digits, batch={"per_device": 32, "accumulation": 1}, schedule={"epochs": 1},
                     train={"max_updates": 4, "label_smoothing": 0.0, "log_every": 1}, ssl=SIMCLR,
                     distributed={"timeout_s": 120, **distributed})
        checked(distrain(["train", cfg, *args], cwd=where, nproc=nproc))
        return read_jsonl(where / "run" / "metrics.jsonl")

    one, two = run(tmp_path / "one", 1), run(tmp_path / "two", 2)
    # the same seeded init, its kNN monitor over the same 1437-sample bank and 360 eval samples
    assert one[0]["eval/knn_top1"] == two[0]["eval/knn_top1"]
    assert one[0]["eval/samples"] == two[0]["eval/samples"] == 360
    summary = json.loads((tmp_path / "two" / "run" / "summary.json").read_text())
    a, b = summary["replica_fingerprints"]
    assert a == b
    # stopped after 2 updates and resumed: the same losses (NT-Xent over both ranks) and weights
    run(tmp_path / "resumed", 2, "train.max_updates=2")
    resumed = run(tmp_path / "resumed", 2, "--resume", "auto")
    losses = [{e["step"]: e["train/loss"] for e in log if "train/loss" in e} for log in (two, resumed)]
    assert losses[1][3] == losses[0][3] and losses[1][4] == losses[0][4]
    final = [load_file(d / "run" / "model.safetensors") for d in (tmp_path / "two", tmp_path / "resumed")]
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])
    # DeepSpeed ZeRO-2 and 3: the gather runs inside its engine's backward as inside DDP's; under
    # ZeRO-3 the kNN monitor's encoder-only forward gathers the partitioned weights on every rank
    for stage in (2, 3):
        log = run(tmp_path / f"zero{stage}", 2, backend="deepspeed", zero_stage=stage)
        assert [e["train/loss"] for e in log if "train/loss" in e] == pytest.approx(
            [losses[0][s] for s in range(1, 5)], rel=1e-4)
        assert [e["eval/knn_top1"] for e in log if "eval/knn_top1" in e] == pytest.approx(
            [e["eval/knn_top1"] for e in two if "eval/knn_top1" in e], abs=0.6)  # 2 of 360 samples
        exported = load_file(tmp_path / f"zero{stage}" / "run" / "model.safetensors")
        assert exported.keys() == final[0].keys()
        assert all(exported[k].shape == final[0][k].shape for k in exported)


def test_the_cifar_stem_of_a_resnet():
    for name in ("resnet18", "timm/resnet18"):
        model = create_model(ModelConfig(name=name, cifar_stem=True), 10)
        assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
        assert isinstance(model.maxpool, torch.nn.Identity)
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(DistrainError, match="model.cifar_stem: vit_b_16 has no ResNet stem"):
        from_dict({"model": {"name": "vit_b_16", "cifar_stem": True}})


@pytest.mark.slow
@pytest.mark.dist
def test_a_rank_with_no_eval_sample_still_joins_the_knn_monitor(tmp_path, digits):
    """One eval sample on 2 ranks: rank 1's share is padding only (as any rank's past the end of a
    small eval set on 512 GPUs). It must join the monitor's reduce with nothing, not fail alone."""
    import webdataset as wds

    from distrain.data.index import write_index

    one = tmp_path / "one-eval"
    one.mkdir()
    with wds.TarWriter(str(one / "e-000000.tar")) as tw:
        tw.write({"__key__": "e0", "png": image_bytes(7), "cls": b"3"})
    write_index(one, [("e-000000.tar", 1)], [str(c) for c in range(10)])
    cfg = recipe(tmp_path, digits, data={"eval": str(one)}, batch={"per_device": 32, "accumulation": 1},
                 schedule={"epochs": 1}, train={"max_updates": 1, "label_smoothing": 0.0}, ssl=SIMCLR,
                 distributed={"timeout_s": 60})
    checked(distrain(["train", cfg], cwd=tmp_path, nproc=2))
    knn = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "eval/knn_top1" in r]
    assert len(knn) == 2 and all(r["eval/samples"] == 1 for r in knn)
