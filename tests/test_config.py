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


def _assert_every_field_documented_and_in_help(config_class):
    lines = describe(config_class)
    for name, f in _leaf_fields(config_class):
        assert f.metadata.get("help"), f"{name} has no help text"
        assert any(line.startswith(name + " ") or line.startswith(name + ":") for line in lines), name
    return lines


def test_every_field_is_documented_and_in_help():
    _assert_every_field_documented_and_in_help(TextRaftConfig)


# ---- bounds declared on the field, checked generically


@pytest.mark.parametrize("modality, override, message", [
    ("text", "finetune.lora.r=0", "config: finetune.lora.r must be >= 1, got 0"),
    ("diffusion", "finetune.lora.r=0", "config: finetune.lora.r must be >= 1, got 0"),  # one declaration, both modalities
    ("text", "finetune.learning_rate=0", "config: finetune.learning_rate must be > 0, got 0.0"),
    ("diffusion", "finetune.caption_dropout=1", "config: finetune.caption_dropout must be in [0, 1), got 1.0"),
    ("text", "selection.diversity.max_similarity=2", "must be in [0, 1] or null, got 2.0"),
    ("text", "generators.0.timeout_s=-1", "config: generators.0.timeout_s must be > 0, got -1.0"),
    ("diffusion", "rankers.0.jpeg_quality=101", "config: rankers.0.jpeg_quality must be in [1, 100], got 101"),
])
def test_a_value_out_of_its_declared_bounds_names_field_bound_and_value(modality, override, message):
    import raft

    with pytest.raises(ConfigError) as caught:
        raft.load_config(modality, overrides=[override])
    assert str(caught.value).endswith(message) and "\n" not in str(caught.value)


def test_a_default_out_of_its_own_bounds_is_a_declaration_error():
    from raft.config import option

    with pytest.raises(ValueError, match="default 0 is not >= 1"):
        option(0, "a count", min=1)


@pytest.mark.parametrize("modality", ["text", "diffusion"])
def test_help_shows_every_field_with_its_default_and_bounds(modality):
    from raft.modalities import get_modality

    lines = _assert_every_field_documented_and_in_help(get_modality(modality).config_class)
    assert any(line.startswith("finetune.lora.r (default ") and ", >= 1): " in line for line in lines)
    assert any(line.startswith("selection.top_fraction (default 0.125, in (0, 1]): ") for line in lines)


# ---- layering: the config sits below the generators, and no modality reaches into another


def _raft_imports(path):
    """The raft modules `path` imports when it runs (imports under `if TYPE_CHECKING:` left out)."""
    import ast

    tree = ast.parse(path.read_text())
    skipped = {id(node) for stmt in ast.walk(tree) if isinstance(stmt, ast.If) and "TYPE_CHECKING" in ast.unparse(stmt.test)
               for node in ast.walk(stmt)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("raft"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("raft")}
    return found


def test_config_and_interface_import_no_generator_and_no_modality():
    from pathlib import Path

    package = Path(__file__).parent.parent / "raft"
    for name in ("config.py", "interface.py", "shares.py"):
        bad = {m for m in _raft_imports(package / name) if m.startswith(("raft.generators", "raft.modalities"))}
        assert not bad, f"raft/{name} imports {bad}"
    assert not _raft_imports(package / "interface.py") - {"raft.errors"}  # the contract stands on nothing of raft


def test_no_modality_imports_another():
    from pathlib import Path

    modalities = Path(__file__).parent.parent / "raft" / "modalities"
    folders = [d for d in modalities.iterdir() if d.is_dir() and (d / "__init__.py").exists()]
    for folder in folders:
        for path in folder.rglob("*.py"):
            others = {m for m in _raft_imports(path) if m.startswith("raft.modalities.")
                      and not m.startswith(f"raft.modalities.{folder.name}")}
            assert not others, f"{path.relative_to(modalities)} imports {others}"


def test_a_literal_word_that_yaml_reads_as_a_boolean(tmp_path):
    """`no` is one of finetune.mixed_precision's words; YAML 1.1 reads it as False."""
    import raft
    from raft.errors import RaftError

    assert raft.load_config("text", overrides=["finetune.mixed_precision=no"]).finetune.mixed_precision == "no"
    path = tmp_path / "c.yaml"
    path.write_text("finetune:\n  mixed_precision: no\n")
    with pytest.raises(RaftError, match="finetune.mixed_precision must be one of .*got False .*quote the word"):
        raft.load_config("text", path)
    path.write_text("finetune:\n  mixed_precision: 'no'\n")
    assert raft.load_config("text", path).finetune.mixed_precision == "no"
