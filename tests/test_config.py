"""Strict config loading: every mistake is one line that names the key."""

import pytest

from byol.train import Config
from core.config import load_config
from core.errors import UserError
from tests.conftest import ROOT, run_cli


def test_defaults_file_and_overrides_merge():
    cfg = load_config(Config, ROOT / "configs/quickstart.yaml", ["train.epochs=3", "run_root=/tmp/x"], stage="byol")
    assert cfg.train.epochs == 3 and cfg.run_root == "/tmp/x"
    assert cfg.data.name == "digits"  # from the file
    assert cfg.eval.knn_temperature == 0.1  # from the schema defaults


@pytest.mark.parametrize("override, expected", [
    ("train.lrr=1", "unknown key 'train.lrr'; did you mean 'lr'?"),
    ("trian.lr=1", "unknown key 'trian'; did you mean 'train'?"),
    ("train.epochs=abc", "bad value for 'train.epochs'"),
    ("model.arch=resnet19", "bad value for 'model.arch': 'resnet19'; choices: resnet18, resnet34, resnet50"),
    ("data.name=mnist", "choices: cifar10, cifar100, stl10, imagefolder, digits, synthetic"),
    ("epochs", "override 'epochs' is not of the form key=value"),
])
def test_bad_override_names_the_key(override, expected):
    with pytest.raises(UserError) as e:
        load_config(Config, ROOT / "configs/quickstart.yaml", [override], stage="byol")
    assert expected in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_key_lists_valid_keys():
    with pytest.raises(UserError) as e:
        load_config(Config, None, ["train.lrr=1"])
    assert "valid keys under train:" in str(e.value) and "batch_size" in str(e.value)


def test_bad_yaml_key_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochz: 3\n")
    with pytest.raises(UserError, match="unknown key 'train.epochz'"):
        load_config(Config, bad)
    with pytest.raises(UserError, match="config file not found"):
        load_config(Config, tmp_path / "nope.yaml")


@pytest.mark.parametrize("text, message", [
    ("", "is empty: a config file holds at least one key"),
    ("- train.lr: 0.1\n", "the top level must be a mapping (key: value lines), not a list"),
    ("train:\n  lr: [0.1\n  epochs: 3\n", ":3:9: "),  # the YAML error's line and column
])
def test_a_bad_yaml_file_is_one_line_naming_it(tmp_path, text, message):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(UserError) as e:
        load_config(Config, f)
    assert message in str(e.value) and str(f) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("override, message", [
    ("train.epochs=-1", "bad value for 'train.epochs': -1; expected >= 1"),
    ("train.epochs=0", "bad value for 'train.epochs': 0; expected >= 1"),  # not a finished, untrained artifact
    ("train.batch_size=0", "bad value for 'train.batch_size': 0; expected >= 1"),
    ("train.lr=-0.1", "bad value for 'train.lr': -0.1; expected >= 0"),
    ("data.val_fraction=1.5", "bad value for 'data.val_fraction': 1.5; expected >= 0 and < 1"),
    ("train.lr=", "'train.lr' is empty; give it a value (train.lr=...)"),
    ("name=", "'name' is empty; give it a value (name=...)"),
])
def test_bad_numbers_and_empty_values_are_one_line_naming_the_key(override, message):
    with pytest.raises(UserError) as e:
        load_config(Config, None, [override])
    assert str(e.value) == message


def test_cli_prints_one_line_and_no_traceback():
    res = run_cli(["-m", "byol", "configs/quickstart.yaml", "train.lrr=1"])
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert lines == [lines[0]] and lines[0].startswith("error: unknown key 'train.lrr'")


def test_pipeline_file_needs_a_stage_and_gives_it_common_plus_its_section():
    with pytest.raises(UserError, match="is a pipeline file"):
        load_config(Config, ROOT / "configs/quickstart.yaml")
    cfg = load_config(Config, ROOT / "configs/quickstart.yaml", stage="byol")
    assert cfg.data.name == "digits" and cfg.name == "quickstart"  # from common
    assert cfg.byol.proj_dim == 128  # from stages.byol
