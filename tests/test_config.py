"""The typed config schema: recipes with ``extends``, dotted overrides, validation and the CLI's error line."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from distrain.cli import main
from distrain.config import (
    Config,
    apply_overrides,
    dump,
    from_dict,
    load_config,
    load_recipe,
    to_dict,
)
from distrain.errors import DistrainError


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def base_recipe(tmp_path: Path) -> Path:
    return write(
        tmp_path / "base.yaml",
        """
        name: base
        data:
          train_crop: 32
          eval_resize: 36
          eval_crop: 32
          hflip: false
        optim:
          lr: 0.1
          momentum: 0.9
          weight_decay: 5.0e-4
        schedule:
          epochs: 10
          milestones: [3, 6, 8]
        """,
    )


# --- recipes and extends --------------------------------------------------------------------------


def test_extends_child_overrides_nested_keys_and_keeps_siblings(tmp_path, base_recipe):
    child = write(
        tmp_path / "child.yaml",
        """
        extends: base.yaml
        name: child
        optim:
          lr: 0.4
        schedule:
          epochs: 20
        """,
    )
    cfg = load_config(child)
    assert cfg.name == "child"
    assert cfg.optim.lr == 0.4
    assert cfg.optim.momentum == 0.9  # sibling from the base kept
    assert cfg.optim.weight_decay == pytest.approx(5e-4)
    assert cfg.schedule.epochs == 20
    assert cfg.schedule.milestones == [3.0, 6.0, 8.0]
    assert cfg.data.hflip is False and cfg.data.train_crop == 32
    # untouched sections keep the schema defaults
    assert cfg.batch.per_device == Config().batch.per_device


def test_extends_chain_of_three_and_relative_paths(tmp_path, base_recipe):
    sub = tmp_path / "sub"
    sub.mkdir()
    write(sub / "mid.yaml", "extends: ../base.yaml\noptim:\n  lr: 0.2\nbatch:\n  per_device: 64\n")
    leaf = write(sub / "leaf.yaml", "extends: mid.yaml\nbatch:\n  accumulation: 4\n")
    data = load_recipe(leaf)
    assert "extends" not in data
    assert data["optim"] == {"lr": 0.2, "momentum": 0.9, "weight_decay": 5.0e-4}
    assert data["batch"] == {"per_device": 64, "accumulation": 4}
    assert data["name"] == "base"


def test_extends_list_later_bases_win_then_child(tmp_path, base_recipe):
    write(tmp_path / "fast.yaml", "optim:\n  lr: 0.8\n  nesterov: true\nbatch:\n  per_device: 16\n")
    child = write(tmp_path / "child.yaml", "extends: [base.yaml, fast.yaml]\nbatch:\n  per_device: 8\n")
    cfg = load_config(child)
    assert cfg.optim.lr == 0.8  # fast.yaml (later) overrides base.yaml
    assert cfg.optim.nesterov is True
    assert cfg.optim.momentum == 0.9  # still from base.yaml
    assert cfg.batch.per_device == 8  # the child wins over all bases


def test_extends_diamond_is_not_a_cycle(tmp_path, base_recipe):
    write(tmp_path / "a.yaml", "extends: base.yaml\nseed: 1\n")
    write(tmp_path / "b.yaml", "extends: base.yaml\nname: b\n")
    top = write(tmp_path / "top.yaml", "extends: [a.yaml, b.yaml]\n")
    cfg = load_config(top)
    assert (cfg.seed, cfg.name, cfg.schedule.epochs) == (1, "b", 10)


def test_extends_cycle_raises(tmp_path):
    write(tmp_path / "a.yaml", "extends: b.yaml\nseed: 1\n")
    write(tmp_path / "b.yaml", "extends: a.yaml\nseed: 2\n")
    with pytest.raises(DistrainError, match="cycle"):
        load_recipe(tmp_path / "a.yaml")


def test_extends_self_cycle_raises(tmp_path):
    write(tmp_path / "self.yaml", "extends: self.yaml\n")
    with pytest.raises(DistrainError, match="cycle"):
        load_config(tmp_path / "self.yaml")


def test_missing_base_and_bad_yaml_are_distrain_errors(tmp_path):
    write(tmp_path / "orphan.yaml", "extends: nowhere.yaml\n")
    with pytest.raises(DistrainError, match="nowhere.yaml"):
        load_config(tmp_path / "orphan.yaml")
    write(tmp_path / "broken.yaml", "optim: [1, 2\n")
    with pytest.raises(DistrainError, match="not valid YAML"):
        load_config(tmp_path / "broken.yaml")
    write(tmp_path / "list.yaml", "- 1\n- 2\n")
    with pytest.raises(DistrainError, match="mapping"):
        load_config(tmp_path / "list.yaml")


def test_empty_recipe_gives_defaults(tmp_path):
    assert load_config(write(tmp_path / "empty.yaml", "")) == Config()


# --- dotted overrides ----------------------------------------------------------------------------


def test_overrides_parse_values_as_yaml():
    data = apply_overrides(
        {},
        [
            "batch.per_device=64",
            "optim.lr=0.25",
            "data.hflip=false",
            "optim.nesterov=true",
            "data.scale=[0.3, 1.0]",
            "name=my-run",
            "train.clip_grad_norm=null",
        ],
    )
    assert data == {
        "batch": {"per_device": 64},
        "optim": {"lr": 0.25, "nesterov": True},
        "data": {"hflip": False, "scale": [0.3, 1.0]},
        "name": "my-run",
        "train": {"clip_grad_norm": None},
    }
    assert type(data["batch"]["per_device"]) is int and type(data["optim"]["lr"]) is float


def test_overrides_create_nested_sections_and_keep_siblings():
    original = {"optim": {"lr": 0.1, "momentum": 0.9}}
    data = apply_overrides(original, ["optim.lr=0.5", "schedule.gamma=0.2", "a.b.c=1"])
    assert data == {"optim": {"lr": 0.5, "momentum": 0.9}, "schedule": {"gamma": 0.2}, "a": {"b": {"c": 1}}}
    assert "schedule" not in original


def test_overrides_do_not_mutate_nested_input():
    original = {"optim": {"lr": 0.1, "momentum": 0.9}}
    apply_overrides(original, ["optim.lr=0.5"])
    assert original == {"optim": {"lr": 0.1, "momentum": 0.9}}


def test_scientific_notation_without_a_dot_is_a_float():
    cfg = from_dict(apply_overrides({}, ["optim.weight_decay=5e-4"]))
    assert cfg.optim.weight_decay == 5e-4
    with pytest.raises(DistrainError, match="optim.weight_decay"):
        from_dict(apply_overrides({}, ["optim.weight_decay=lots"]))


def test_overrides_apply_in_order():
    assert apply_overrides({}, ["seed=1", "seed=2"]) == {"seed": 2}


def test_override_of_a_key_from_the_base_recipe(tmp_path, base_recipe):
    child = write(tmp_path / "child.yaml", "extends: base.yaml\noptim:\n  lr: 0.4\n")
    cfg = load_config(child, ["optim.momentum=0.5", "optim.lr=1", "data.eval_crop=30", "schedule.milestones=[2, 4]"])
    assert cfg.optim.momentum == 0.5  # only in base.yaml
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.weight_decay == pytest.approx(5e-4)
    assert cfg.data.eval_crop == 30 and cfg.data.eval_resize == 36
    assert cfg.schedule.milestones == [2.0, 4.0]


@pytest.mark.parametrize("bad", ["optim.lr", "=3", " =3"])
def test_malformed_override_raises(bad):
    with pytest.raises(DistrainError, match="section.key=value"):
        apply_overrides({}, [bad])


# --- unknown keys ---------------------------------------------------------------------------------


def test_unknown_key_names_full_dotted_key_and_suggests():
    with pytest.raises(DistrainError) as e:
        from_dict(apply_overrides({}, ["optim.lrr=0.1"]))
    msg = str(e.value)
    assert "optim.lrr" in msg
    assert "did you mean optim.lr" in msg


def test_unknown_key_in_recipe_file(tmp_path):
    recipe = write(tmp_path / "r.yaml", "data:\n  eval_crp: 32\n")
    with pytest.raises(DistrainError, match=r"data\.eval_crp.*did you mean data\.eval_crop"):
        load_config(recipe)


def test_unknown_section():
    with pytest.raises(DistrainError) as e:
        from_dict({"optimizer": {"lr": 0.1}})
    assert "optimizer" in str(e.value)
    assert "did you mean optim" in str(e.value)
    with pytest.raises(DistrainError) as e:
        from_dict({"zzzz": 1})
    msg = str(e.value)
    assert "unknown config key zzzz" in msg
    assert "valid:" in msg and "optim" in msg and "schedule" in msg


def test_section_that_is_not_a_mapping():
    with pytest.raises(DistrainError, match=r"^optim: expected"):
        from_dict({"optim": 0.1})


# --- types ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, key, expected",
    [
        ("batch.per_device=abc", "batch.per_device", "int"),
        ("batch.per_device=2.5", "batch.per_device", "int"),
        ("batch.per_device=true", "batch.per_device", "int"),
        ("data.hflip=3", "data.hflip", "bool"),
        ("optim.lr=fast", "optim.lr", "float"),
        ("optim.lr=true", "optim.lr", "float"),
        ("name=[1, 2]", "name", "str"),
        ("data.scale=0.5", "data.scale", "list of float"),
    ],
)
def test_wrong_type_names_key_and_type(override, key, expected):
    with pytest.raises(DistrainError) as e:
        from_dict(apply_overrides({}, [override]))
    msg = str(e.value)
    assert msg.startswith(f"{key}: expected")
    assert expected in msg


def test_list_element_type_error_names_index():
    with pytest.raises(DistrainError, match=r"data\.mean\[1\]: expected float"):
        from_dict({"data": {"mean": [0.5, "x", 0.5]}})


def test_literal_names_allowed_values():
    with pytest.raises(DistrainError) as e:
        from_dict(apply_overrides({}, ["schedule.decay=linear"]))
    msg = str(e.value)
    assert msg.startswith("schedule.decay:")
    for allowed in ("cosine", "multistep", "constant"):
        assert allowed in msg
    assert "linear" in msg
    with pytest.raises(DistrainError, match=r"optim\.name:.*'sgd'.*'adamw'"):
        from_dict({"optim": {"name": "adam"}})
    with pytest.raises(DistrainError, match=r"model\.norm:.*'batch'.*'group'"):
        from_dict({"model": {"norm": "batchnorm"}})


def test_optional_and_union_fields():
    cfg = from_dict({"train": {"clip_grad_norm": 1}, "schedule": {"warmup_start_lr": None}})
    assert cfg.train.clip_grad_norm == 1.0 and isinstance(cfg.train.clip_grad_norm, float)
    assert cfg.schedule.warmup_start_lr is None
    assert from_dict({"data": {"train": ["a/*.tar", "b/*.tar"]}}).data.train == ["a/*.tar", "b/*.tar"]
    assert from_dict({"data": {"prepare": "digits"}}).data.prepare == "digits"
    with pytest.raises(DistrainError, match=r"data\.train: expected"):
        from_dict({"data": {"train": 5}})
    with pytest.raises(DistrainError, match=r"data\.prepare: expected"):
        from_dict({"data": {"prepare": "cifar"}})


def test_int_accepted_for_float_fields():
    cfg = from_dict({"optim": {"lr": 1, "weight_decay": 0, "betas": [1, 1]}, "schedule": {"warmup_epochs": 5}})
    assert cfg.optim.lr == 1.0 and type(cfg.optim.lr) is float
    assert type(cfg.optim.weight_decay) is float
    assert all(type(b) is float for b in cfg.optim.betas)
    assert type(cfg.schedule.warmup_epochs) is float


# --- ranges ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["batch.per_device=0"], "batch.per_device"),
        (["batch.accumulation=-1"], "batch.accumulation"),
        (["schedule.epochs=0"], "schedule.epochs"),
        (["optim.lr=-0.1"], "optim.lr"),
        (["data.scale=[0.5, 0.2]"], "data.scale"),
        (["data.scale=[0.5, 1.5]"], "data.scale"),
        (["data.scale=[0.5]"], "data.scale"),
        (["data.ratio=[0, 1]"], "data.ratio"),
        (["data.eval_crop=300", "data.eval_resize=256"], "data.eval_crop"),
        (["optim.nesterov=true", "optim.momentum=0"], "optim.nesterov"),
        (["train.label_smoothing=1.0"], "train.label_smoothing"),
        (["train.clip_grad_norm=0"], "train.clip_grad_norm"),
        (["schedule.warmup_epochs=100", "schedule.epochs=90"], "schedule.warmup_epochs"),
        (["schedule.milestones=[60, 30]"], "schedule.milestones"),
        (["data.mean=[0.5, 0.5]"], "data.mean"),
        (["data.std=[0.5, 0, 0.5]"], "data.std"),
        (["optim.betas=[0.9]"], "optim.betas"),
    ],
)
def test_range_checks_name_the_key(overrides, key):
    with pytest.raises(DistrainError) as e:
        from_dict(apply_overrides({}, overrides))
    assert str(e.value).startswith(f"{key}:")


def test_boundary_values_are_accepted():
    cfg = from_dict(
        apply_overrides(
            {},
            ["data.eval_crop=256", "data.eval_resize=256", "data.scale=[1, 1]", "optim.lr=0",
             "optim.momentum=0", "optim.nesterov=false", "schedule.warmup_epochs=90", "schedule.epochs=90"],
        )
    )
    assert cfg.data.eval_crop == cfg.data.eval_resize == 256
    assert cfg.data.scale == [1.0, 1.0]


# --- dump round-trip ------------------------------------------------------------------------------


def test_defaults_are_valid():
    assert from_dict({}) == Config()


def test_dump_round_trips(tmp_path, base_recipe):
    cfg = load_config(
        base_recipe,
        ["data.train=[a/*.tar, b/*.tar]", "data.prepare=digits", "train.clip_grad_norm=2",
         "schedule.warmup_start_lr=0.01", "optim.eps=1.0e-8", "optim.weight_decay=0.00005", "run_dir=out/x"],
    )
    text = dump(cfg)
    again = from_dict(yaml.safe_load(text))
    assert again == cfg
    assert to_dict(again) == to_dict(cfg)
    # and through a file, as `config.yaml` of a run
    p = tmp_path / "config.yaml"
    p.write_text(text)
    assert load_config(p) == cfg
    assert cfg.out_dir == Path("out/x")


def test_dump_round_trips_defaults():
    assert from_dict(yaml.safe_load(dump(Config()))) == Config()
    assert Config(name="abc").out_dir == Path("runs/abc")


# --- the CLI's one-line error ---------------------------------------------------------------------


def _assert_one_error_line(capsys, rc: int, *needles: str) -> str:
    out, err = capsys.readouterr()
    assert rc == 2
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("distrain: error:")
    assert "Traceback" not in err and "Traceback" not in out
    for n in needles:
        assert n in lines[0]
    return lines[0]


@pytest.mark.parametrize("command", ["train", "plan"])
def test_cli_bad_recipe_key_is_one_line(tmp_path, capsys, command):
    bad = write(tmp_path / "bad.yaml", "optim:\n  lrr: 0.1\n")
    rc = main([command, str(bad)])
    _assert_one_error_line(capsys, rc, "optim.lrr", "did you mean optim.lr")


@pytest.mark.parametrize("command", ["train", "plan"])
def test_cli_bad_override_is_one_line(tmp_path, capsys, command):
    recipe = write(tmp_path / "ok.yaml", "data:\n  train_samples: 1000\n")
    rc = main([command, str(recipe), "batch.per_device=abc"])
    _assert_one_error_line(capsys, rc, "batch.per_device", "int")


@pytest.mark.parametrize("command", ["train", "plan"])
def test_cli_bad_range_and_cycle_are_one_line(tmp_path, capsys, command):
    bad = write(tmp_path / "bad.yaml", "data:\n  scale: [0.5, 0.2]\n")
    _assert_one_error_line(capsys, main([command, str(bad)]), "data.scale")
    write(tmp_path / "a.yaml", "extends: b.yaml\n")
    write(tmp_path / "b.yaml", "extends: a.yaml\n")
    _assert_one_error_line(capsys, main([command, str(tmp_path / "a.yaml")]), "cycle")


def test_cli_missing_recipe_is_one_line(tmp_path, capsys):
    rc = main(["plan", str(tmp_path / "missing.yaml")])
    _assert_one_error_line(capsys, rc, "missing.yaml")


@pytest.mark.parametrize("path", sorted((REPO / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path):
    load_config(path)


def test_deit_recipe_plans_the_numbers_its_header_derives(capsys):
    recipe_path = REPO / "configs" / "imagenet" / "deit_small.yaml"
    assert main(["plan", str(recipe_path), "--nodes", "3", "--gpus-per-node", "4"]) == 0
    rows = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in capsys.readouterr().out.splitlines())
    assert (rows["per-device batch"], rows["global batch"], rows["updates per epoch"]) == ("84", "1008", "1270")
    assert (rows["total updates"], rows["warmup updates"]) == ("381000", "6350 from LR 1e-06")
    assert rows["peak LR"] == "0.000984375 (linear scaling)"
    assert rows["distinct samples per epoch"] == "426720 (3 repeats)"
