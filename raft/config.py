"""Config dataclasses and the machinery that fills them from YAML and `key.sub=value` overrides.

Every field is declared with `option(default, "help")`, so the dataclass tree is the single place where
a setting, its default and its documentation live; `raft run --help` prints it. Modalities subclass
`RaftConfig` and add their own sections.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Union

import yaml

from raft.errors import ConfigError


def option(default: Any, help: str) -> Any:
    """A dataclass field with a default and a help string (mutable defaults are copied per instance)."""
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        proto = default
        return field(default_factory=lambda: _copy(proto), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def _copy(value: Any) -> Any:
    import copy

    return copy.deepcopy(value)


@dataclass
class DiversityConfig:
    """Diversity-aware selection: the kept set must not be many copies of one reply."""

    max_similarity: float | None = option(
        None,
        "Skip a candidate whose similarity to a sample already kept this iteration (any prompt) is above this, "
        "and keep the next-best distinct one instead; similarity is the cosine of the modality's features "
        "(`features`), in [0, 1] for text n-grams and CLIP images. null: off.",
    )
    features: str = option(
        "auto",
        "What similarity compares. text: ngram (word 1- and 2-gram counts) or embedding (all-MiniLM-L6-v2 "
        "sentence embeddings); diffusion: clip (CLIP image embeddings, the eval embedding model) or pixels. "
        "auto: ngram for text, clip for diffusion.",
    )
    max_opening_share: float | None = option(
        None,
        "Text: at most this share of the iteration's kept samples may open with the same `opening_words` words "
        "(lower-cased); further ones are skipped for the next-best candidate. null: off.",
    )
    opening_words: int = option(
        4, "Words that make a text sample's opening for max_opening_share (the eval/top_opening_share metric always "
        "counts 4).")


@dataclass
class SelectionConfig:
    """Which scored samples are kept for fine-tuning."""

    strategy: Literal["local", "global", "threshold", "all"] = option(
        "local",
        "local: best `keep_per_prompt` of the K samples of each prompt; global: best `top_fraction` "
        "of all samples of the iteration, across prompts; threshold: every sample with reward >= "
        "`min_reward`; all: every sample not discarded (for fine-tuners that rank candidates, e.g. RRHF).",
    )
    keep_per_prompt: int = option(1, "Samples kept per prompt by the local strategy (m of K).")
    top_fraction: float = option(0.125, "Fraction of all samples kept by the global strategy (1/K in the RAFT paper).")
    min_reward: float | None = option(
        None, "Reward floor: required by the threshold strategy, an extra filter for the others (null: none)."
    )
    diversity: DiversityConfig = option(DiversityConfig(), "Diversity-aware selection (off by default in the base config).")


@dataclass
class KLConfig:
    """KL-regularized ranking (the RAFT paper's objective): samples are ranked by reward - beta * KL_i."""

    beta: float = option(
        0.0,
        "Weight of KL_i in the ranking score reward - beta * KL_i, where KL_i = log pi(y|x) - log pi_0(y|x) is "
        "the sample's log-ratio between the current policy and the starting one, summed over the response "
        "(the start value when adaptive). 0: rank by reward alone.",
    )
    adaptive: bool = option(
        False, "Adapt beta between iterations so the policy samples' mean KL_i tracks `target` (PPO's controller).")
    target: float = option(4.0, "adaptive: target mean KL_i of the policy's samples, in nats per response.")
    horizon: int = option(
        400, "adaptive: horizon in samples: beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * samples / horizon.")


@dataclass
class GuardConfig:
    """Collapse guard: bounds on the held-out metrics, checked after every evaluated iteration (see eval_every)."""

    max_kl: float | None = option(
        None, "Stop once eval/kl_to_start (KL of the policy to the starting model on held-out samples, nats per "
        "response) exceeds this. null: no bound.")
    min_distinct_2_ratio: float | None = option(
        None, "Stop once held-out distinct-2 falls below this fraction of the starting model's. null: no bound.")
    max_opening_share: float | None = option(
        None, "Stop once the share of held-out replies opening with the most common first words "
        "(eval/top_opening_share) exceeds this. null: no bound.")
    min_diversity_ratio: float | None = option(
        None, "Stop once held-out within-prompt embedding diversity (eval/diversity_within_prompt, images) falls "
        "below this fraction of the starting model's. null: no bound.")
    action: Literal["stop", "rollback"] = option(
        "stop",
        "What crossing a bound does: stop (the run ends after that iteration, its checkpoint the latest) or "
        "rollback (it ends too, but the iteration's weights are not kept: the last good checkpoint stays the "
        "run's model). Either way one line says which bound, by how much.",
    )


# the metric each guard bound reads, and whether it is relative to the starting model's value
GUARD_BOUNDS = {
    "max_kl": ("eval/kl_to_start", False),
    "min_distinct_2_ratio": ("eval/distinct_2", True),
    "max_opening_share": ("eval/top_opening_share", False),
    "min_diversity_ratio": ("eval/diversity_within_prompt", True),
}


@dataclass
class RaftConfig:
    """Settings of the RAFT loop shared by every modality."""

    modality: str = option("text", "Which modality runs: text or diffusion (or a registered plug-in).")
    run_dir: str = option("", "Run directory. Empty: runs/<modality>-<date>-<time>.")
    seed: int = option(0, "Seed of everything random: prompt order, sampling, fine-tuning, evaluation.")
    iterations: int = option(4, "RAFT iterations (generate -> rank -> select -> fine-tune -> evaluate).")
    prompts_per_iteration: int = option(16, "Prompts drawn per iteration (b in the paper).")
    samples_per_prompt: int = option(8, "Samples generated per prompt (K in the paper).")
    keep_checkpoints: int = option(1, "Checkpoints kept in the run directory (newest first); >= 1 so a run can resume.")
    prompts_per_shard: int | None = option(
        None, "Prompts sampled together under one seed (a shard); the shards of an iteration, and of the held-out "
        "evaluation, are spread over the processes of a multi-process run (torchrun, accelerate launch). null: one "
        "shard per process. Samples depend on the shard size, not on the number of processes: fix it to get the "
        "same samples from 1 or N processes.")
    eval_every: int = option(
        1, "Held-out evaluation (reward, KL to the start, diversity, perplexity; what the guard checks) after every "
        "this many iterations, and always after the last one (and before training). 1: every iteration. The "
        "training samples' own figures (reward, KL_i) are recorded every iteration either way.")
    max_train_seconds: float | None = option(
        None, "Wall-clock budget: start no further iteration once the completed ones spent this many seconds "
        "generating, ranking, selecting and fine-tuning (evaluation not counted); null: run all iterations.")
    ranker_timeout_s: float | None = option(
        None, "Seconds one scoring call of the rankers may take; longer stops the run in one line (completed "
        "iterations stay). null: no limit.")
    trackers: list[str] = option(
        ["tensorboard"], "Experiment trackers (accelerate's): tensorboard (written to RUN/tensorboard), wandb, trackio, "
        "mlflow (RUN/mlruns); each metrics row at its iteration and a table of the iteration's samples. []: none.")
    ranker_aggregation: Literal["sum", "zscore", "rank"] = option(
        "sum", "How the rankers' scores combine into the reward. sum: sum of weight * score; zscore: each ranker's "
        "scores standardized over the batch scored together (the iteration's samples; the held-out samples), then "
        "summed with the weights; rank: weighted average of each ranker's rank in that batch, in [0, 1]. Raw and "
        "normalized scores are both recorded per sample (rewards, rewards_normalized), and eval/reward/<ranker> "
        "is each ranker's raw held-out mean.")
    selection: SelectionConfig = option(SelectionConfig(), "Selection of the kept set.")
    kl: KLConfig = option(KLConfig(), "KL-regularized ranking against the starting model.")
    guard: GuardConfig = option(GuardConfig(), "Collapse guard: bounds on held-out metrics that stop the run.")

    # What a modality offers the collapse defences; its config class says so, so that bad settings are refused
    # before anything loads.
    reference_logprobs: ClassVar[bool] = False  # can compute KL_i (kl.beta > 0, guard.max_kl)
    diversity_features: ClassVar[tuple[str, ...]] = ()  # selection.diversity.features it accepts (first: auto)
    text_openings: ClassVar[bool] = False  # samples have openings (selection.diversity.max_opening_share)
    guard_metrics: ClassVar[tuple[str, ...]] = ()  # the eval/ metrics it produces, for guard bounds

    def validate(self) -> None:
        """Range checks that types alone cannot express; subclasses extend it."""
        self._validate_defences()
        _check(self.seed >= 0, "seed", "must be >= 0")
        _check(self.iterations >= 0, "iterations", "must be >= 0")
        from raft.trackers import check_trackers

        check_trackers(self.trackers)
        _check(self.prompts_per_iteration >= 1, "prompts_per_iteration", "must be >= 1")
        _check(self.samples_per_prompt >= 1, "samples_per_prompt", "must be >= 1")
        _check(self.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1")
        _check(self.eval_every >= 1, "eval_every", "must be >= 1")
        _check(self.prompts_per_shard is None or self.prompts_per_shard >= 1, "prompts_per_shard", "must be >= 1 or null")
        _check(self.max_train_seconds is None or self.max_train_seconds > 0, "max_train_seconds", "must be > 0 or null")
        _check(self.ranker_timeout_s is None or self.ranker_timeout_s > 0, "ranker_timeout_s", "must be > 0 or null")
        sel = self.selection
        _check(1 <= sel.keep_per_prompt <= self.samples_per_prompt, "selection.keep_per_prompt",
               f"must be between 1 and samples_per_prompt ({self.samples_per_prompt})")
        _check(0.0 < sel.top_fraction <= 1.0, "selection.top_fraction", "must be in (0, 1]")
        _check(sel.strategy != "threshold" or sel.min_reward is not None, "selection.min_reward",
               "is required by the threshold strategy")


    def _validate_defences(self) -> None:
        kl, diversity, guard = self.kl, self.selection.diversity, self.guard
        _check(kl.beta >= 0, "kl.beta", "must be >= 0")
        _check(kl.target > 0, "kl.target", "must be > 0")
        _check(kl.horizon >= 1, "kl.horizon", "must be >= 1")
        _check(not kl.adaptive or kl.beta > 0, "kl.beta", "must be > 0 when kl.adaptive (it is the start value)")
        _check(kl.beta == 0 or self.reference_logprobs, "kl.beta",
               f"must be 0: the {self.modality} modality cannot compute reference log-likelihoods for KL_i")
        _check(diversity.max_similarity is None or 0 <= diversity.max_similarity <= 1,
               "selection.diversity.max_similarity", "must be in [0, 1] or null")
        _check(diversity.max_opening_share is None or 0 < diversity.max_opening_share <= 1,
               "selection.diversity.max_opening_share", "must be in (0, 1] or null")
        _check(diversity.opening_words >= 1, "selection.diversity.opening_words", "must be >= 1")
        _check(diversity.max_opening_share is None or self.text_openings, "selection.diversity.max_opening_share",
               f"must be null: samples of the {self.modality} modality have no opening words")
        accepted = ("auto", *self.diversity_features)
        _check(diversity.features in accepted, "selection.diversity.features",
               f"must be one of {', '.join(accepted)} for the {self.modality} modality, got {diversity.features!r}")
        _check(diversity.max_similarity is None or len(accepted) > 1, "selection.diversity.max_similarity",
               f"must be null: the {self.modality} modality has no sample features to compare")
        for name, (metric, relative) in GUARD_BOUNDS.items():
            bound = getattr(guard, name)
            if bound is None:
                continue
            _check(metric in self.guard_metrics, f"guard.{name}",
                   f"must be null: the {self.modality} modality does not produce {metric}")
            if relative or name == "max_opening_share":
                _check(0 < bound <= 1, f"guard.{name}", "must be in (0, 1]")
            else:
                _check(bound > 0, f"guard.{name}", "must be > 0")


def check_ranker_weights(rankers: list) -> None:
    """Weights are finite (the loader checks that) and not all 0: a reward of 0 for everything ranks nothing."""
    _check(not rankers or any(r.weight != 0 for r in rankers), "rankers",
           "weights are all 0: no sample would rank above another")


def _check(condition: bool, name: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"config: {name} {message}")



@dataclass
class GeneratorConfig:
    """The settings every modality's `generators:` entry has; a modality subclasses it, narrowing `kind` and
    adding its own sampling-only settings."""

    kind: str = option("policy", "policy: the model being aligned samples (the default); file: pre-generated samples.")
    name: str | None = option(
        None, "Name recorded in each sample's `generator` (default: the kind). A policy entry is always 'policy'.")
    share: float = option(
        1.0, "Relative share of the samples_per_prompt samples of each prompt; shares are normalized over the list.")
    sampling_template: str = option(
        "{prompt}",
        "Magic prompt: what is sent instead of the prompt, `{prompt}` replaced by it (e.g. '{prompt} Be upbeat.'). "
        "Sampling only: rankers, fine-tuning and evaluation keep the original prompt; samples record `prompt_sent`.",
    )
    path: str | None = option(
        None,
        "kind file: a .jsonl/.json/.csv/.parquet file, a folder saved by datasets' save_to_disk, or a hub dataset "
        "id; one row per sample. Its prompts are matched after data.prompt_template is applied.",
    )
    split: str = option("train", "kind file: the split of a hub dataset or of a saved DatasetDict.")
    prompt_field: str = option("prompt", "kind file: column holding the prompt.")


def check_generators(entries: list[GeneratorConfig], samples_per_prompt: int, sampling_only: tuple[str, ...]) -> None:
    """What holds for any `generators:` list: positive shares that give every entry a sample of each prompt,
    one name each ('policy' for the policy), a `{prompt}` in every template, and files with a path and none
    of the sampling-only settings (`sampling_only`: the modality's own, besides sampling_template)."""
    from raft.generators.mixture import split_counts

    _check(bool(entries), "generators", "must list at least one generator (kind policy samples the policy)")
    names: dict[str, int] = {}
    for i, g in enumerate(entries):
        where = f"generators.{i}"
        _check(g.share > 0, f"{where}.share", "must be > 0")
        _check(g.kind != "policy" or g.name in (None, "policy"), f"{where}.name",
               "of kind policy is always 'policy' (what reward/policy_mean counts)")
        name = "policy" if g.kind == "policy" else g.name or g.kind
        _check(bool(name.strip()), f"{where}.name", "must not be empty")
        _check(name not in names, f"{where}.name",
               f"'{name}' is also generators.{names.get(name)}'s; give each generator its own name")
        names[name] = i
        _check("{prompt}" in g.sampling_template, f"{where}.sampling_template", "must contain {prompt}")
        if g.kind == "file":
            _check(bool(g.path), f"{where}.path", "is required by kind file")
            _check(g.sampling_template == "{prompt}" and all(getattr(g, f) is None for f in sampling_only),
                   f"{where}.sampling_template",
                   f"and {' and '.join(sampling_only)} do not apply to kind file: its samples are already generated")
    for i, count in enumerate(split_counts([g.share for g in entries], samples_per_prompt)):
        _check(count >= 1, f"generators.{i}.share",
               f"gives it 0 of the samples_per_prompt ({samples_per_prompt}) samples of a prompt; "
               "raise its share or samples_per_prompt")

# ----------------------------------------------------------------------------------------------
# dict <-> dataclass


def to_dict(config: Any) -> Any:
    """The plain-data form of a config (what config.yaml holds)."""
    if dataclasses.is_dataclass(config):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (list, tuple)):
        return [to_dict(v) for v in config]
    if isinstance(config, dict):
        return {k: to_dict(v) for k, v in config.items()}
    return config


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass `cls` from plain data, naming the offending field on any mismatch."""
    if isinstance(data, Override):
        data = data.value
    if not isinstance(data, dict):
        raise ConfigError(f"config: {path or 'top level'} must be a mapping, got {_show(data)}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    values = {}
    for key, value in data.items():
        name = f"{path}{key}"
        if key not in known:
            raise ConfigError(f"config: unknown key '{name}' (known here: {', '.join(known)})")
        values[key] = _convert(hints[key], value, name)
    return cls(**values)


def _convert(hint: Any, value: Any, name: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if isinstance(value, Override):
        value = value.for_type(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option_type in (a for a in args if a is not type(None)):
            try:
                return _convert(option_type, value, name)
            except ConfigError as error:
                errors.append(error)
        raise errors[0] if len(errors) == 1 else ConfigError(
            f"config: {name} must be {_type_name(hint)}, got {_show(value)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"config: {name} must be one of {', '.join(map(str, args))}; got {_show(value)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config: {name} must be a list, got {_show(value)}")
        return [_convert(args[0], v, f"{name}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config: {name} must be a mapping, got {_show(value)}")
        # values may be command-line Overrides (`key.sub.entry=value`), converted like any other value
        return {k: _convert(args[1] if args else Any, v, f"{name}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, f"{name}.")
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # PyYAML reads 2e-5 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):  # no setting means anything at NaN or infinity (null turns bounds off)
                raise ConfigError(f"config: {name} must be a finite number, got {_show(value)}")
            return number
    elif hint is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"unsupported config type {hint!r} for {name}")
    raise ConfigError(f"config: {name} must be {_type_name(hint)}, got {_show(value)}")


def _type_name(hint: Any) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if hint in names:
        return names[hint]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if args and typing.get_origin(hint) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args) + (" or null" if len(args) < len(typing.get_args(hint)) else "")
    return getattr(hint, "__name__", str(hint))


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ----------------------------------------------------------------------------------------------
# YAML files and command-line overrides


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] = (), base: dict | None = None) -> Any:
    """Defaults of `cls` <- `base` (a saved config) <- YAML file <- `key.sub=value` overrides, validated."""
    data = to_dict(cls())
    if base is not None:
        data = _merge(data, base)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config: file '{path}' does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"config: '{path}' is not valid YAML ({str(error).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config: '{path}' must hold a mapping of settings")
        data = _merge(data, loaded)
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise ConfigError(f"config: override '{override}' is not of the form key.sub=value")
        _set_path(data, key.strip(), Override(raw))
    config = from_dict(cls, data)
    config.validate()
    return config


class Override:
    """A command-line value: read as YAML, except where a string field gets YAML structure (`{prompt}`)."""

    def __init__(self, raw: str):
        self.raw = raw
        try:
            self.value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            self.value = raw

    def for_type(self, hint: Any) -> Any:
        takes_text = hint is str or (typing.get_origin(hint) in (Union, types.UnionType) and str in typing.get_args(hint))
        return self.raw if takes_text and isinstance(self.value, (dict, list)) else self.value


def _merge(base: Any, update: Any) -> Any:
    """Mappings merge key by key; anything else (lists included) replaces."""
    if isinstance(base, dict) and isinstance(update, dict):
        merged = dict(base)
        for key, value in update.items():
            merged[key] = _merge(base[key], value) if key in base else value
        return merged
    return update


def _set_path(data: dict, dotted: str, value: Any) -> None:
    node: Any = data
    parts = dotted.split(".")
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"config: '{where}' is not an index of a list of {len(node)} entries")
            index = int(part)
            if last:
                node[index] = value
            else:
                node = node[index]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if part not in node:
                    raise ConfigError(f"config: unknown key '{where}'")
                if node[part] is None:
                    node[part] = {}
                node = node[part]
        else:
            raise ConfigError(f"config: '{'.'.join(parts[:depth])}' has no sub-keys (override '{dotted}')")


def describe(cls: type, prefix: str = "", instance: Any = None) -> list[str]:
    """One help line per leaf field: `name (type, default X): help`. Defaults are read from `instance` (default
    cls()), so a section whose parent sets other defaults (the text default's model section) shows those."""
    lines = []
    hints = typing.get_type_hints(cls)
    instance = cls() if instance is None else instance
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(hint):
            lines.append(f"{prefix}{f.name}: {f.metadata.get('help', '')}")
            lines += describe(hint, f"{prefix}{f.name}.", value)
            continue
        inner = typing.get_args(hint)[0] if typing.get_origin(hint) is list and typing.get_args(hint) else None
        shown = yaml.safe_dump(to_dict(value), default_flow_style=True, width=10_000).strip().removesuffix("...").strip()
        lines.append(f"{prefix}{f.name} (default {shown}): {f.metadata.get('help', '')}")
        if inner is not None and dataclasses.is_dataclass(inner):
            lines += describe(inner, f"{prefix}{f.name}.N.")
    return lines


def dump_yaml(config: Any) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False, width=100)
