"""The configuration: one source of defaults, strict validation once at the boundary."""

from __future__ import annotations

import typing

import pytest
import yaml

from headclass.config import HeadclassConfig, default_config_path, load_config
from headclass.errors import ConfigError


def _models(model: type) -> typing.Iterator[type]:
    yield model
    for field in model.model_fields.values():
        if isinstance(field.annotation, type) and hasattr(field.annotation, "model_fields"):
            yield from _models(field.annotation)


def test_defaults_live_only_in_default_yaml():
    # no pydantic field carries a default of its own: the YAML is the one source
    for model in _models(HeadclassConfig):
        with_default = [name for name, field in model.model_fields.items() if not field.is_required()]
        assert with_default == [], f"{model.__name__} repeats defaults: {with_default}"
    shipped = yaml.safe_load(default_config_path().read_text(encoding="utf-8"))
    assert load_config().model_dump(mode="json") == shipped


def test_a_key_missing_from_the_defaults_is_named(monkeypatch):
    import headclass.config as config

    defaults = yaml.safe_load(default_config_path().read_text(encoding="utf-8"))
    del defaults["thresholds"]["bos"]
    monkeypatch.setattr(config, "_defaults", lambda: defaults)
    with pytest.raises(ConfigError, match=r"thresholds\.bos: missing"):
        load_config()


@pytest.mark.parametrize(
    "override, message",
    [
        ({"thresholds": {"induction": "0.5"}}, r"thresholds\.induction: input should be a valid number \(got '0\.5'\)"),
        ({"probes": {"batch_size": True}}, r"probes\.batch_size: input should be a valid integer \(got True\)"),
        ({"probes": {"batch_size": 2.0}}, r"probes\.batch_size: input should be a valid integer"),
        ({"ablation": {"mode": "fast"}}, r"ablation\.mode: input should be 'exact' or 'attribution' \(got 'fast'\)"),
        ({"ablation": {"method": "MEAN"}}, r"ablation\.method: input should be 'zero' or 'mean'"),
        ({"patterns": {"exclude_bos": "yes"}}, r"patterns\.exclude_bos: input should be a valid boolean"),
        ({"thresholds": {"inducton": 0.5}}, r"thresholds\.inducton: unknown key"),
    ],
)
def test_strict_types_and_enumerations(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(override)


def test_an_int_is_still_a_float():
    assert load_config({"thresholds": {"bos": 1}}).thresholds.bos == 1.0


def test_duplicate_keys_are_an_error(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("thresholds:\n  induction: 0.5\n  induction: 0.6\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"dup\.yaml.*'induction' appears twice"):
        load_config(path)
    path.write_text("thresholds:\n  induction: 0.5\nthresholds:\n  bos: 0.5\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="'thresholds' appears twice"):
        load_config(path)


def test_non_utf8_config_names_the_file(tmp_path):
    path = tmp_path / "latin.yaml"
    path.write_bytes("thresholds:\n  induction: 0.5  # \u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin\.yaml' is not UTF-8"):
        load_config(path)


def test_a_folder_is_called_a_folder(tmp_path):
    with pytest.raises(ConfigError, match="is a folder, not a YAML file"):
        load_config(tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="empty"):
        load_config("")


def test_every_error_is_one_line():
    with pytest.raises(ConfigError) as info:
        load_config({"thresholds": {"induction": 7, "bos": "x"}, "probes": {"seed": 1.5}})
    assert "\n" not in str(info.value)
    assert "thresholds.induction" in str(info.value) and "thresholds.bos" in str(info.value)


def test_yaml_comments_say_which_way_a_threshold_goes():
    text = default_config_path().read_text(encoding="utf-8")
    line = next(line for line in text.splitlines() if line.strip().startswith("diffuse_max_attention"))
    assert "<=" in line
    from headclass.taxonomy import RULES

    # the rule the comment describes is the rule the taxonomy applies
    ops = {c.threshold: c.op for rule in RULES.values() for c in rule.conditions}
    assert ops["diffuse_max_attention"] == "<="


def test_the_validated_config_passes_through_unchanged():
    cfg = load_config({"thresholds": {"induction": 0.3}})
    assert load_config(cfg) is cfg
    assert HeadclassConfig.defaults() == load_config()
