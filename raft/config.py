"""Config dataclasses and the machinery that fills them from YAML and `key.sub=value` overrides.

Every field is declared with `option(default, "help", min=..., max=...)`, so the dataclass tree is the single
place where a setting, its default, its documentation and the range it accepts live; `raft run --help` prints
it and `check_bounds` enforces the ranges. The sections every modality has (model, data, generation,
generators, rankers, finetune with lora, eval) are declared here once; a modality subclasses them, adding its
own settings and giving its own defaults (`with_default`), and subclasses `RaftConfig` to narrow them.
Checks that are not a range (one field against another, a setting a modality cannot honour) are written by
hand in `validate`.
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
from raft.interface import POLICY_GENERATOR
from raft.shares import split_counts


@dataclass(frozen=True)
class Bounds:
    """The range a number setting accepts: `min`/`max` inclusive, `above`/`below` exclusive (None: no bound)."""

    min: float | None = None
    max: float | None = None
    above: float | None = None
    below: float | None = None

    def __bool__(self) -> bool:
        return any(bound is not None for bound in dataclasses.astuple(self))

    def holds(self, value: float) -> bool:
        return ((self.min is None or value >= self.min) and (self.max is None or value <= self.max)
                and (self.above is None or value > self.above) and (self.below is None or value < self.below))

    def __str__(self) -> str:
        """What error messages and --help say: '>= 1', '> 0', '<= 100', 'in [0, 1]', 'in (0, 1]', ..."""
        low = (f"[{self.min:g}" if self.min is not None else f"({self.above:g}" if self.above is not None else None)
        high = (f"{self.max:g}]" if self.max is not None else f"{self.below:g})" if self.below is not None else None)
        if low and high:
            return f"in {low}, {high}"
        if low:
            return (">= " if low[0] == "[" else "> ") + low[1:]
        return ("<= " if high[-1] == "]" else "< ") + high[:-1]


def option(default: Any, help: str, *, min: float | None = None, max: float | None = None,
           above: float | None = None, below: float | None = None) -> Any:
    """A dataclass field with a default, a help string and, for a number, the range it accepts (`min`/`max`
    inclusive, `above`/`below` exclusive; a null value of an optional field is always accepted). Mutable
    defaults are copied per instance."""
    if (min is not None and above is not None) or (max is not None and below is not None):
        raise ValueError("a bound is inclusive (min, max) or exclusive (above, below), not both")
    bounds = Bounds(min, max, above, below)
    if bounds and isinstance(default, (int, float)) and not bounds.holds(default):
        raise ValueError(f"default {default!r} is not {bounds}")  # a declaration mistake: fails on import
    metadata = {"help": help, "bounds": bounds or None}
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        proto = default
        return field(default_factory=lambda: _copy(proto), metadata=metadata)
    return field(default=default, metadata=metadata)


def with_default(section: type, name: str, default: Any, help: str | None = None) -> Any:
    """Field `name` of the shared `section`, redeclared in a modality's subclass with the modality's default (and
    help, where the modality has more to say); its bounds stay the ones declared once on the shared field."""
    declared = section.__dataclass_fields__[name]
    bounds = declared.metadata.get("bounds")
    return option(default, help or declared.metadata["help"], **(dataclasses.asdict(bounds) if bounds else {}))


def _copy(value: Any) -> Any:
    import copy

    return copy.deepcopy(value)


def require(condition: bool, name: str, message: str) -> None:
    """A hand-written check (a rule across fields, or more than a range): `name` is the field's dotted path."""
    if not condition:
        raise ConfigError(f"config: {name} {message}")


def check_bounds(config: Any, prefix: str = "") -> None:
    """Every range declared with `option(..., min=, max=, above=, below=)` in `config`, its sections and the
    entries of its lists; the first value out of range stops with one line: the field, the range, the value."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        name, value = prefix + f.name, getattr(config, f.name)
        bounds = f.metadata.get("bounds")
        if bounds and value is not None and not bounds.holds(value):
            raise ConfigError(f"config: {name} must be {accepted(bounds, hints[f.name])}, got {_show(value)}")
        if dataclasses.is_dataclass(value):
            check_bounds(value, f"{name}.")
        elif isinstance(value, list):
            for i, entry in enumerate(value):
                if dataclasses.is_dataclass(entry):
                    check_bounds(entry, f"{name}.{i}.")


def accepted(bounds: Bounds, hint: Any) -> str:
    """What a bounded field accepts, as errors and --help say it: 'in [0, 1]', or 'in [0, 1] or null'."""
    return f"{bounds} or null" if type(None) in typing.get_args(hint) else str(bounds)


# ----------------------------------------------------------------------------------------------
# the loop's own sections


@dataclass
class DiversityConfig:
    """Diversity-aware selection: the kept set must not be many copies of one reply."""

    max_similarity: float | None = option(
        None,
        "Skip a candidate whose similarity to a sample already kept this iteration (any prompt) is above this, "
        "and keep the next-best distinct one instead; similarity is the cosine of the modality's features "
        "(`features`), in [0, 1] for text n-grams and CLIP images. null: off.", min=0, max=1,
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
        "(lower-cased); further ones are skipped for the next-best candidate. null: off.", above=0, max=1,
    )
    opening_words: int = option(
        4, "Words that make a text sample's opening for max_opening_share (the eval/top_opening_share metric always "
        "counts 4).", min=1)


@dataclass
class SelectionConfig:
    """Which scored samples are kept for fine-tuning."""

    strategy: Literal["local", "global", "threshold", "all"] = option(
        "local",
        "local: best `keep_per_prompt` of the K samples of each prompt; global: best `top_fraction` "
        "of all samples of the iteration, across prompts; threshold: every sample with reward >= "
        "`min_reward`; all: every sample not discarded (for fine-tuners that rank candidates, e.g. RRHF).",
    )
    keep_per_prompt: int = option(1, "Samples kept per prompt by the local strategy (m of K); at most samples_per_prompt.",
                                  min=1)
    top_fraction: float = option(0.125, "Fraction of all samples kept by the global strategy (1/K in the RAFT paper).",
                                 above=0, max=1)
    max_per_prompt: int | None = option(
        None, "global: at most this many kept samples per prompt (null: no cap). The global strategy keeps the best "
        "samples of the iteration wherever they are, which favours prompts whose replies are easy to make score; "
        "a cap spreads the kept set over more prompts.", min=1)
    min_reward: float | None = option(
        None, "Reward floor: required by the threshold strategy, an extra filter for the others (null: none)."
    )
    diversity: DiversityConfig = option(DiversityConfig(), "Diversity-aware selection (off by default in the base config).")
    replay_iterations: int = option(
        0, "Kept-set replay: each iteration also fine-tunes on the kept samples of up to this many earlier iterations, "
        "read back from the run directory, so the training set grows as the loop runs (ReST's growing dataset); the "
        "fine-tuner's epochs pass over all of it. 0: each iteration trains on its own kept set only; -1: on every "
        "earlier one. Use it when the kept set of one iteration is small (a strict min_reward keeps few). Not text's "
        "finetune.replay, which replays reference texts, not kept samples.", min=-1)


@dataclass
class KLConfig:
    """KL-regularized ranking (the RAFT paper's objective): samples are ranked by reward - beta * KL_i."""

    beta: float = option(
        0.0,
        "Weight of KL_i in the ranking score reward - beta * KL_i, where KL_i = log pi(y|x) - log pi_0(y|x) is "
        "the sample's log-ratio between the current policy and the starting one, summed over the response "
        "(the start value when adaptive). 0: rank by reward alone.", min=0,
    )
    adaptive: bool = option(
        False, "Adapt beta between iterations so the policy samples' mean KL_i tracks `target` (PPO's controller).")
    target: float = option(4.0, "adaptive: target mean KL_i of the policy's samples, in nats per response.", above=0)
    horizon: int = option(
        400, "adaptive: horizon in samples: beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * samples / horizon.", min=1)


@dataclass
class GuardConfig:
    """Collapse guard: bounds on the held-out metrics, checked after every evaluated iteration (see eval_every)."""

    max_kl: float | None = option(
        None, "Stop once eval/kl_to_start (KL of the policy to the starting model on held-out samples, nats per "
        "response) exceeds this. null: no bound.", above=0)
    min_distinct_2_ratio: float | None = option(
        None, "Stop once held-out distinct-2 falls below this fraction of the starting model's. null: no bound.",
        above=0, max=1)
    max_opening_share: float | None = option(
        None, "Stop once the share of held-out replies opening with the most common first words "
        "(eval/top_opening_share) exceeds this. null: no bound.", above=0, max=1)
    min_diversity_ratio: float | None = option(
        None, "Stop once held-out within-prompt embedding diversity (eval/diversity_within_prompt, images) falls "
        "below this fraction of the starting model's. null: no bound.", above=0, max=1)
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


# ----------------------------------------------------------------------------------------------
# the sections every modality has, declared once; a modality subclasses each with its own settings and defaults


@dataclass
class ModelConfig:
    """The model being aligned."""

    name_or_path: str = option("", "The model to align: a Hugging Face hub id, a local directory, or builtin:NAME.")
    revision: str | None = option(None, "Hub revision (branch, tag or commit) of name_or_path.")
    dtype: Literal["float32", "bfloat16", "float16"] = option("float32", "Weights dtype for sampling and training.")
    device: str = option("auto", "auto (cuda when available, else cpu), cpu, cuda or cuda:N.")


@dataclass
class DataConfig:
    """Training and held-out prompts."""

    prompts: str = option(
        "", "Training prompts: a modality's builtin set, or a file: .txt (one per line), .jsonl/.json, .csv or "
        ".parquet (column `prompt_field`).")
    prompt_field: str = option("prompt", "Column holding the prompt in .jsonl/.json/.csv/.parquet files.")
    prompt_template: str = option(
        "{prompt}",
        "Turns each prompt into the text the model is given; `{prompt}` is replaced by the prompt. Part of the "
        "task: used in sampling and training alike.",
    )
    eval_prompts: str | None = option(
        None, "Held-out prompts in the same formats. null: `eval_size` prompts are split off `prompts` and never "
        "trained on.")
    eval_size: int = option(32, "Held-out prompts used for evaluation.", min=1)


@dataclass
class GenerationConfig:
    """Sampling settings of every generator."""

    batch_size: int = option(
        32, "Samples generated per forward batch (the prompts x samples of a call are cut into batches of this size).",
        min=1)


@dataclass
class GeneratorConfig:
    """The settings every modality's `generators:` entry has; a modality subclasses it, narrowing `kind` and
    adding its own sampling-only settings."""

    kind: str = option("policy", "policy: the model being aligned samples (the default); file: pre-generated samples.")
    name: str | None = option(
        None, f"Name recorded in each sample's `generator` (default: the kind). A policy entry is always "
        f"'{POLICY_GENERATOR}'.")
    share: float = option(
        1.0, "Relative share of the samples_per_prompt samples of each prompt; shares are normalized over the list.",
        above=0)
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


@dataclass
class RankerConfig:
    """The settings every modality's `rankers:` entry has; a modality subclasses it, narrowing `kind` and adding
    its rankers' settings."""

    kind: str = option("callable", "callable: a Python function fn(prompts, outputs) -> list of floats.")
    name: str | None = option(None, "Name in metrics and records (default: derived from the ranker).")
    weight: float = option(1.0, "Weight of this ranker when several are combined (reward = weighted sum).")
    function: str | None = option(None, "kind callable: module:function or path/to/file.py:function.")
    batch_size: int = option(32, "Model rankers: outputs scored per forward pass.", min=1)


@dataclass
class LoraConfig:
    enabled: bool = option(False, "Train a LoRA adapter (peft) instead of all weights.")
    r: int = option(16, "LoRA rank.", min=1)
    alpha: int = option(32, "LoRA alpha (scale = alpha / r).", min=1)
    dropout: float = option(0.0, "LoRA dropout.", min=0, below=1)
    target_modules: list[str] = option(["all-linear"], "Modules to adapt; ['all-linear'] adapts every linear layer but the output head.")


@dataclass
class FinetuneConfig:
    """Fine-tuning on the kept samples (raft/finetune/'s trainer)."""

    learning_rate: float = option(2e-4, "AdamW learning rate (after the warm-up).", above=0)
    warmup_steps: int = option(
        0, "Optimizer steps at the start of each iteration's fine-tuning over which the learning rate rises linearly "
        "to learning_rate (step i of the first warmup_steps uses (i + 1) / (warmup_steps + 1) of it). A fresh AdamW's "
        "first steps move every weight by about the learning rate, whatever the gradient's size.", min=0)
    epochs: int = option(2, "Passes over the kept set per iteration.", min=1)
    batch_size: int = option(
        8, "Examples per optimizer step (split into micro-batches by gradient_accumulation_steps).", min=1)
    gradient_accumulation_steps: int = option(1, "Micro-batches per optimizer step; must divide batch_size.", min=1)
    max_grad_norm: float = option(1.0, "Gradient clipping norm (0: off).", min=0)
    weight_decay: float = option(0.0, "AdamW weight decay.", min=0)
    adam_epsilon: float = option(
        1e-8, "AdamW's epsilon (torch's default), added to the root of each weight's second moment before dividing: a "
        "weight whose gradients are far below it barely moves; one whose gradients are tiny but above it moves by "
        "about the learning rate all the same, float rounding in them included. A larger epsilon (1e-6 to 1e-4) damps "
        "such weights.", above=0)
    carry_optimizer_state: bool = option(
        False, "Keep AdamW moments across iterations (and in checkpoints). Off: a fresh optimizer each iteration.")
    gradient_checkpointing: bool = option(False, "Trade compute for memory during fine-tuning.")
    mixed_precision: Literal["no", "bf16", "fp16", "auto"] = option(
        "no", "Mixed precision of fine-tuning (accelerate's autocast; the weights stay in model.dtype): bf16 (GPUs that "
        "have it, and CPUs), fp16 (CUDA, with loss scaling) or no. auto: bf16 where the hardware runs it natively "
        "(CUDA with bf16, CPUs with avx512_bf16/AMX), else no.")
    lora: LoraConfig = option(LoraConfig(), "LoRA adapter settings.")


@dataclass
class EvalConfig:
    """Held-out evaluation of the policy."""

    samples_per_prompt: int = option(2, "Policy samples per held-out prompt for the held-out reward.", min=1)
    seed: int = option(1234, "Sampling seed of the evaluation, the same every iteration so iterations compare paired.",
                       min=0)


# ----------------------------------------------------------------------------------------------
# the whole config


@dataclass
class RaftConfig:
    """Settings of the RAFT loop, and the sections every modality has (a modality narrows them)."""

    modality: str = option("text", "Which modality runs: text or diffusion (or a registered plug-in).")
    run_dir: str = option("", "Run directory. Empty: runs/<modality>-<date>-<time>.")
    seed: int = option(0, "Seed of everything random: prompt order, sampling, fine-tuning, evaluation.", min=0)
    iterations: int = option(4, "RAFT iterations (generate -> rank -> select -> fine-tune -> evaluate).", min=0)
    prompts_per_iteration: int = option(16, "Prompts drawn per iteration (b in the paper).", min=1)
    samples_per_prompt: int = option(8, "Samples generated per prompt (K in the paper).", min=1)
    keep_checkpoints: int = option(
        1, "Checkpoints kept in the run directory (newest first); at least 1 so a run can resume.", min=1)
    prompts_per_shard: int | None = option(
        None, "Prompts sampled together under one seed (a shard); the shards of an iteration, and of the held-out "
        "evaluation, are spread over the processes of a multi-process run (torchrun, accelerate launch). null: one "
        "shard per process. Samples depend on the shard size, not on the number of processes: fix it to get the "
        "same samples from 1 or N processes.", min=1)
    eval_every: int = option(
        1, "Held-out evaluation (reward, KL to the start, diversity, perplexity; what the guard checks) after every "
        "this many iterations, and always after the last one (and before training). 1: every iteration. The "
        "training samples' own figures (reward, KL_i) are recorded every iteration either way.", min=1)
    max_train_seconds: float | None = option(
        None, "Wall-clock budget: start no further iteration once the completed ones spent this many seconds "
        "generating, ranking, selecting and fine-tuning (evaluation not counted); null: run all iterations.", above=0)
    ranker_timeout_s: float | None = option(
        None, "Seconds one scoring call of the rankers may take; longer stops the run in one line (completed "
        "iterations stay). null: no limit.", above=0)
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
    model: ModelConfig = option(ModelConfig(), "The policy model.")
    data: DataConfig = option(DataConfig(), "Prompts and held-out prompts.")
    generation: GenerationConfig = option(GenerationConfig(), "Sampling settings (of every generator).")
    generators: list[GeneratorConfig] = option(
        [GeneratorConfig()],
        "Where the training samples come from: the policy (default), pre-generated files, or a mixture of them by "
        "share. The held-out evaluation always samples the policy.",
    )
    rankers: list[RankerConfig] = option([], "Rewards; several are combined as a weighted sum.")
    finetune: FinetuneConfig = option(FinetuneConfig(), "Fine-tuning on the kept set.")
    eval: EvalConfig = option(EvalConfig(), "Held-out evaluation.")

    # What a modality offers the collapse defences; its config class says so, so that bad settings are refused
    # before anything loads.
    reference_logprobs: ClassVar[bool] = False  # can compute KL_i (kl.beta > 0, guard.max_kl)
    diversity_features: ClassVar[tuple[str, ...]] = ()  # selection.diversity.features it accepts (first: auto)
    text_openings: ClassVar[bool] = False  # samples have openings (selection.diversity.max_opening_share)
    guard_metrics: ClassVar[tuple[str, ...]] = ()  # the eval/ metrics it produces, for guard bounds
    # the generators' settings that only apply when sampling (besides sampling_template), refused for kind file
    sampling_only: ClassVar[tuple[str, ...]] = ()

    def validate(self) -> None:
        """The declared ranges of every field, then the rules across fields; subclasses extend it."""
        check_bounds(self)
        self._validate_defences()
        from raft.trackers import check_trackers

        check_trackers(self.trackers)
        sel = self.selection
        require(sel.keep_per_prompt <= self.samples_per_prompt, "selection.keep_per_prompt",
                f"must be between 1 and samples_per_prompt ({self.samples_per_prompt}), got {sel.keep_per_prompt}")
        require(sel.strategy != "threshold" or sel.min_reward is not None, "selection.min_reward",
                "is required by the threshold strategy")
        require(sel.replay_iterations == 0 or getattr(self.finetune, "objective", "sft") == "sft",
                "selection.replay_iterations", "must be 0 unless finetune.objective is sft: RRHF ranks one iteration's "
                "candidates per prompt, PPO learns from the policy's current samples only")
        require("{prompt}" in self.data.prompt_template, "data.prompt_template", "must contain {prompt}")
        check_generators(self.generators, self.samples_per_prompt, self.sampling_only)
        check_rankers(self.rankers)
        f = self.finetune
        require(f.batch_size % f.gradient_accumulation_steps == 0, "finetune.gradient_accumulation_steps",
                f"must divide finetune.batch_size ({f.batch_size}), got {f.gradient_accumulation_steps}")
        require(bool(f.lora.target_modules), "finetune.lora.target_modules", "must name at least one module")

    def _validate_defences(self) -> None:
        kl, diversity, guard = self.kl, self.selection.diversity, self.guard
        require(not kl.adaptive or kl.beta > 0, "kl.beta", "must be > 0 when kl.adaptive (it is the start value)")
        require(kl.beta == 0 or self.reference_logprobs, "kl.beta",
                f"must be 0: the {self.modality} modality cannot compute reference log-likelihoods for KL_i")
        require(diversity.max_opening_share is None or self.text_openings, "selection.diversity.max_opening_share",
                f"must be null: samples of the {self.modality} modality have no opening words")
        features = ("auto", *self.diversity_features)
        require(diversity.features in features, "selection.diversity.features",
                f"must be one of {', '.join(features)} for the {self.modality} modality, got {diversity.features!r}")
        require(diversity.max_similarity is None or len(features) > 1, "selection.diversity.max_similarity",
                f"must be null: the {self.modality} modality has no sample features to compare")
        for name, (metric, _) in GUARD_BOUNDS.items():
            require(getattr(guard, name) is None or metric in self.guard_metrics, f"guard.{name}",
                    f"must be null: the {self.modality} modality does not produce {metric}")


def check_rankers(rankers: list[RankerConfig]) -> None:
    """At least one ranker, weights not all 0 (a reward of 0 for everything ranks nothing; the loader checks
    they are finite), and a function for each callable one."""
    require(bool(rankers), "rankers", "must list at least one ranker")
    require(any(r.weight != 0 for r in rankers), "rankers", "weights are all 0: no sample would rank above another")
    for i, ranker in enumerate(rankers):
        require(ranker.kind != "callable" or bool(ranker.function), f"rankers.{i}.function", "is required by kind callable")


def check_generators(entries: list[GeneratorConfig], samples_per_prompt: int, sampling_only: tuple[str, ...]) -> None:
    """What holds for any `generators:` list: shares that give every entry a sample of each prompt, one name
    each (POLICY_GENERATOR for the policy), a `{prompt}` in every template, and files with a path and none of
    the sampling-only settings (`sampling_only`: the modality's own, besides sampling_template)."""
    require(bool(entries), "generators", "must list at least one generator (kind policy samples the policy)")
    names: dict[str, int] = {}
    for i, g in enumerate(entries):
        where = f"generators.{i}"
        require(g.kind != "policy" or g.name in (None, POLICY_GENERATOR), f"{where}.name",
                f"of kind policy is always '{POLICY_GENERATOR}' (what reward/policy_mean counts)")
        name = generator_name(g)
        require(bool(name.strip()), f"{where}.name", "must not be empty")
        require(name not in names, f"{where}.name",
                f"'{name}' is also generators.{names.get(name)}'s; give each generator its own name")
        names[name] = i
        require("{prompt}" in g.sampling_template, f"{where}.sampling_template", "must contain {prompt}")
        if g.kind == "file":
            require(bool(g.path), f"{where}.path", "is required by kind file")
            others = "".join(f"and {setting} " for setting in sampling_only)
            require(g.sampling_template == "{prompt}" and all(getattr(g, f) is None for f in sampling_only),
                    f"{where}.sampling_template",
                    f"{others}{'do' if others else 'does'} not apply to kind file: its samples are already generated")
    for i, count in enumerate(split_counts([g.share for g in entries], samples_per_prompt)):
        require(count >= 1, f"generators.{i}.share",
                f"gives it 0 of the samples_per_prompt ({samples_per_prompt}) samples of a prompt; "
                "raise its share or samples_per_prompt")


def generator_name(entry: GeneratorConfig) -> str:
    """The name a `generators:` entry's samples are recorded under (`Sample.meta[META_GENERATOR]`)."""
    return POLICY_GENERATOR if entry.kind == "policy" else entry.name or entry.kind


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
        if isinstance(value, bool) and str(value).lower() not in map(str, args):
            hint_text = " (YAML reads an unquoted no, yes, off or on as a boolean: quote the word)"
        else:
            hint_text = ""
        if value not in args or isinstance(value, bool) and not any(isinstance(a, bool) for a in args):
            raise ConfigError(f"config: {name} must be one of {', '.join(map(str, args))}; got {_show(value)}{hint_text}")
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
        if typing.get_origin(hint) is Literal and self.raw in map(str, typing.get_args(hint)):
            return self.raw  # one of the field's words, though YAML would read `no` as a boolean
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
    """One help line per leaf field: `name (default X[, range]): help`. Defaults are read from `instance` (default
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
        bounds = f.metadata.get("bounds")
        shown += f", {accepted(bounds, hint)}" if bounds else ""
        lines.append(f"{prefix}{f.name} (default {shown}): {f.metadata.get('help', '')}")
        if inner is not None and dataclasses.is_dataclass(inner):
            lines += describe(inner, f"{prefix}{f.name}.N.")
    return lines


def dump_yaml(config: Any) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False, width=100)
