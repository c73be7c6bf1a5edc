"""The modality interface: what the RAFT loop needs from a modality, and nothing more.

A modality (a folder under raft/modalities/, or a plug-in registered under the `raft.modalities`
entry-point group) provides a config class and a `build` function returning `Components`. The loop in
raft/loop.py only talks to these types, so it never knows whether it aligns text or images.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # the config sits above this contract (its checks use the names below), so no runtime import
    from raft.config import RaftConfig

# The generator name the policy's own samples are recorded under: what reward/policy_mean counts, what the KL
# adaptation reads, and the only generator PPO learns from.
POLICY_GENERATOR = "policy"

# Keys of `Sample.meta` that components write and others rely on (samples.jsonl records them too).
META_GENERATOR = "generator"  # name of the generator that sampled it (POLICY_GENERATOR for the policy)
META_PROMPT_SENT = "prompt_sent"  # the text actually sent when sampling (a magic prompt's, or the prompt)
META_SETTINGS = "settings"  # the sampling settings used (a file generator: its source and row)
META_SEED = "seed"  # the sample's own seed, where the generator has one (diffusion: the image's noise)
META_FINISHED = "finished"  # text: ended on its own (EOS) rather than running out of tokens; missing: True
META_TOKEN_IDS = "token_ids"  # text: the response's token ids exactly as sampled (the policy's samples only)
META_LOGPROB = "logprob"  # text: log pi(response | prompt) as sampled, at the sampling temperature (the policy's)
META_WEIGHTS_VERSION = "weights_version"  # text, backend vllm: the policy's weights synced into the engine: 1, 2, ...
META_WEIGHTS_CHECKSUM = "weights_checksum"  # text, backend vllm: their checksum, as the engine was checked to hold
META_PROMPT_TOKENS_CUT = "prompt_tokens_cut"  # text: prompt tokens cut from the left to fit the context
META_NOT_KEPT = "not_kept"  # why diversity-aware selection passed a candidate over
META_REWARDS_NORMALIZED = "rewards_normalized"  # per ranker, the score after ranker_aggregation's normalization
META_KEYS = (META_GENERATOR, META_PROMPT_SENT, META_SETTINGS, META_SEED, META_FINISHED, META_TOKEN_IDS, META_LOGPROB,
             META_WEIGHTS_VERSION, META_WEIGHTS_CHECKSUM, META_PROMPT_TOKENS_CUT, META_NOT_KEPT, META_REWARDS_NORMALIZED)


@dataclass
class Sample:
    """One generated output and everything the loop learns about it."""

    prompt_index: int  # position of its prompt in the iteration's prompt batch
    prompt: str  # the prompt fine-tuning sees (never a sampling-only "magic" prompt)
    output: Any  # str for text, an image for diffusion
    meta: dict[str, Any] = field(default_factory=dict)  # provenance, under the META_* keys above
    reward: float = math.nan
    rewards: dict[str, float] = field(default_factory=dict)  # per-ranker scores when rankers are combined
    discard_reason: str | None = None  # set by a discard rule: never selected
    selected: bool = False
    # log pi(y|x) - log pi_0(y|x) summed over the response: the sample's log-ratio between the current policy and
    # the starting one (nan when not computed)
    kl: float = math.nan
    score: float | None = None  # what selection ranks by: reward - beta * kl under KL-regularized ranking; None: reward

    @property
    def ranking_score(self) -> float:
        return self.reward if self.score is None else self.score


class Generator(ABC):
    """Produces K samples per prompt."""

    name: str = "generator"

    @abstractmethod
    def generate(self, prompts: list[str], samples_per_prompt: int, seed: int) -> list[Sample]:
        """Return `samples_per_prompt` samples for each prompt, grouped by prompt, reproducible from `seed`."""


class Ranker(ABC):
    """Scores samples; higher is better. Scoring is batched: one call gets a whole iteration."""

    name: str = "ranker"

    @abstractmethod
    def score(self, samples: list[Sample]) -> list[float]:
        """One finite float per sample, in order."""


class FineTuner(ABC):
    """Updates the policy on the selected samples with a supervised loss."""

    @abstractmethod
    def finetune(self, selected: list[Sample], seed: int) -> dict[str, float]:
        """Train on `selected`; return metrics such as the mean loss."""

    @abstractmethod
    def save_checkpoint(self, directory: Path | None) -> None:
        """Write everything needed to resume (weights or adapter, optimizer state if carried). Under N processes
        every process calls it at the same point (gathering sharded weights is collective); only the main one
        gets a directory, the others None."""


class ReferenceModel(ABC):
    """The starting policy, kept to measure how far the current one moved (a modality that can compute
    log-likelihoods provides one; KL-regularized ranking and the KL metric need it)."""

    @abstractmethod
    def log_ratios(self, samples: list[Sample]) -> list[float]:
        """Per sample: log pi(y|x) - log pi_0(y|x) summed over the response, from the tokens actually sampled."""

    @abstractmethod
    def kl_to_start(self, samples: list[Sample]) -> list[float]:
        """Per held-out sample: KL(pi || pi_0) at each response position (exact over the outcomes), summed over
        the response; its mean over the policy's own samples estimates the sequence KL with low variance."""


class Evaluator(ABC):
    """Modality metrics on the policy's held-out samples (the loop computes their reward itself)."""

    @abstractmethod
    def evaluate(self, eval_samples: list[Sample], iteration: int = 0, last: bool = True) -> dict[str, float]:
        """Metrics such as perplexity on reference data, diversity and length. `iteration` (0: the starting policy)
        and `last` (this evaluation may be the run's last one) let a modality measure a costly, slow-moving metric
        at fewer evaluations than the others."""


DiscardRule = Callable[[Sample], "str | None"]  # returns why a sample is discarded, or None to keep it


@dataclass
class Components:
    """What a modality builds for one run."""

    prompts: list[str]  # the training prompt pool
    eval_prompts: list[str]  # held-out prompts, never trained on
    generator: Generator  # produces the training samples (the policy, or anything else)
    policy: Generator  # the policy itself: samples held-out prompts for evaluation
    ranker: Ranker
    finetuner: FineTuner
    evaluator: Evaluator
    discard_rules: list[DiscardRule] = field(default_factory=list)
    reference: ReferenceModel | None = None  # None: the modality cannot compute KL to the start
    # L2-normalised feature rows of samples, for diversity-aware selection (cosine = dot product); None: none
    features: Callable[[list[Sample]], Any] | None = None
    # a text sample's opening (its first `words` words, normalised), for the opening cap and its metric; None:
    # samples have no opening
    opening: Callable[[Sample, int], str] | None = None
    eval_samples_per_prompt: int = 1
    eval_best_of_n: int = 0  # before training, measure best-of-n sampling at inference on the held-out prompts
    eval_seed: int = 0
    # turns a sample's output into JSON-able data; may write files (images) under the given folder
    output_to_record: Callable[[Any, Path, str], Any] = lambda output, folder, key: output
    # the inverse: a record's output back into a sample's output (selection.replay_iterations reads earlier kept sets)
    record_to_output: Callable[[Any, Path], Any] = lambda record, folder: record
    # writes an iteration's extra files (an image grid, ...) into its folder, given its samples by file name
    # ("samples", "selected", "eval_samples"; iteration 0 has only "eval_samples")
    write_files: Callable[[Path, dict[str, list[Sample]]], None] = lambda folder, files: None


class Modality(ABC):
    name: str
    config_class: type[RaftConfig]  # the modality's settings: a RaftConfig subclass narrowing its sections

    @abstractmethod
    def build(self, config: RaftConfig, checkpoint: Path | None) -> Components:
        """Build the run's components; `checkpoint` is the last completed iteration's when resuming."""
