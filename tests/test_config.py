import dataclasses
import typing

import pytest

from raft.config import describe, load_config
from raft.errors import ConfigError
from raft.modalities.text.config import TextRaftConfig


def test_defaults_validate_and_overrides_apply():
    config = load_config(TextRaftConfig, None, ["iterations=3", "finetune.learning_rate=1e-4",
                                                "generation.max_new_tokens_range=[16, 48]", "rankers.0.weight=2"])
    assert config.iterations == 3
    assert config.finetune.learning_rate == 1e-4
    assert config.generation.max_new_tokens_range == [16, 48]
    assert config.rankers[0].weight == 2.0


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("iterations: 7\nselection:\n  strategy: global\n  top_fraction: 0.2\n")
    config = load_config(TextRaftConfig, path, ["iterations=9"])
    assert (config.iterations, config.selection.strategy, config.selection.top_fraction) == (9, "global", 0.2)
    assert config.selection.keep_per_prompt == 1  # untouched defaults survive a partial section


@pytest.mark.parametrize("overrides, message", [
    (["finetune.lrr=1"], "unknown key 'finetune.lrr'"),
    (["nonsense=1"], "unknown key 'nonsense'"),
    (["iterations=abc"], "iterations must be an integer, got 'abc'"),
    (["iterations=2.5"], "iterations must be an integer"),
    (["finetune.learning_rate=fast"], "finetune.learning_rate must be a number"),
    (["model.chat_template=maybe"], "model.chat_template must be true or false"),
    (["selection.strategy=best"], "selection.strategy must be one of local, global, threshold"),
    (["selection.strategy=threshold"], "selection.min_reward is required"),
    (["selection.keep_per_prompt=20"], "selection.keep_per_prompt must be between 1 and samples_per_prompt"),
    (["rankers.0.kind=classifier"], "rankers.0.model is required"),
    (["rankers.3.weight=1"], "'rankers.3' is not an index"),
    (["generation.max_new_tokens_range=[48, 16]"], "generation.max_new_tokens_range must be [low, high)"),
    (["iterations"], "is not of the form key.sub=value"),
    (["iterations.deep=1"], "'iterations' has no sub-keys"),
])
def test_bad_values_name_the_field(overrides, message):
    with pytest.raises(ConfigError) as caught:
        load_config(TextRaftConfig, None, overrides)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_malformed_yaml_is_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("iterations: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(TextRaftConfig, path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(TextRaftConfig, tmp_path / "missing.yaml")


def _leaf_fields(cls, prefix=""):
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        yield prefix + f.name, f
        if dataclasses.is_dataclass(hint):
            yield from _leaf_fields(hint, prefix + f.name + ".")


def test_every_field_is_documented_and_in_help():
    lines = describe(TextRaftConfig)
    for name, f in _leaf_fields(TextRaftConfig):
        assert f.metadata.get("help"), f"{name} has no help text"
        assert any(line.startswith(name + " ") or line.startswith(name + ":") for line in lines), name
