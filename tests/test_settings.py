"""Pipeline settings: defaults < --config file (its own section, or the whole file) < flags."""

import argparse

import pytest

from distributed.settings import add_flags, resolve

DEFAULTS = {"lr": 1e-3, "epochs": 20, "targets": [2.0], "gpu": False, "floor": None}


def _parse(argv):
    p = argparse.ArgumentParser()
    add_flags(p, DEFAULTS, types={"floor": float})
    return resolve(vars(p.parse_args(argv)), DEFAULTS, "meta_train", "test")


def test_file_section_then_flags(tmp_path):
    path = tmp_path / "best.yaml"
    path.write_text("meta_train: {lr: 0.01, epochs: 5}\nprune_batch: {after_lr: 0.1}\n")
    config = _parse(["--config", str(path), "--epochs", "7", "--targets", "2", "4", "--floor", "0.9", "--gpu"])
    assert config == {"lr": 0.01, "epochs": 7, "targets": [2.0, 4.0], "gpu": True, "floor": 0.9}
    assert _parse([]) == DEFAULTS


def test_a_file_without_sections_and_bad_files(tmp_path):
    flat = tmp_path / "flat.yaml"
    flat.write_text("lr: 0.5\n")
    assert _parse(["--config", str(flat)])["lr"] == 0.5
    bad = tmp_path / "bad.yaml"
    bad.write_text("meta_train: {learning_rate: 0.5}\n")
    with pytest.raises(SystemExit, match="learning_rate: unknown key"):
        _parse(["--config", str(bad)])
    with pytest.raises(SystemExit, match="config file not found"):
        _parse(["--config", str(tmp_path / "missing.yaml")])


@pytest.mark.parametrize("text, message", [
    ("meta_train: {lr: fast}\n", "meta_train.yaml: meta_train: lr = 'fast': must be a valid number"),
    ("meta_train: {targets: 2}\n", "targets = 2: must be a valid list"),
    ("meta_train: 3\n", "meta_train: must be a mapping of settings"),
    ("[1, 2]\n", "a config file must be a mapping"),
    ("lr: [\n", "not valid YAML"),
])
def test_bad_values_name_the_key_and_value(text, message, tmp_path):
    path = tmp_path / "meta_train.yaml"
    path.write_text(text)
    with pytest.raises(SystemExit) as err:
        _parse(["--config", str(path)])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_setting_named_like_a_class_attribute_builds_without_a_warning(recwarn):
    # meta_train's --register: ABCMeta's `register` on pydantic's base; the warning littered make demo's log
    from distributed.settings import settings_model

    assert settings_model({"register": None}).model_validate({"register": "name"}).model_dump() == {"register": "name"}
    assert not [w for w in recwarn if "shadows an attribute" in str(w.message)]
