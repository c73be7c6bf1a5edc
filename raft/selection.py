"""Selection of the kept set from scored samples, and the discard rules that run before it."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Callable

import numpy as np

from raft.config import SelectionConfig
from raft.interface import META_NOT_KEPT, DiscardRule, Sample


def apply_discard_rules(samples: list[Sample], rules: list[DiscardRule]) -> int:
    """Mark samples that break a rule (first rule wins); returns how many were discarded."""
    discarded = 0
    for sample in samples:
        for rule in rules:
            reason = rule(sample)
            if reason:
                sample.discard_reason = reason
                discarded += 1
                break
    return discarded


def select(samples: list[Sample], config: SelectionConfig,
           features: Callable[[list[Sample]], Any] | None = None,
           opening: Callable[[Sample], str] | None = None) -> list[Sample]:
    """Mark and return the kept samples, best ranking score first (reward, minus beta * KL when regularized).

    Discarded samples and those below `min_reward` never qualify. Ties keep the earlier sample, so selection
    is deterministic. With diversity-aware selection (`config.diversity`), a candidate too similar to a sample
    already kept, or whose opening has reached its cap, is passed over (`meta[META_NOT_KEPT]` says why) and the
    next-best distinct candidate takes its place: a prompt whose candidates are all near-copies of kept ones
    keeps fewer, because training on copies is what collapses a policy.
    """
    candidates = [s for s in samples if s.discard_reason is None and not math.isnan(s.reward)]
    if config.min_reward is not None:
        candidates = [s for s in candidates if s.reward >= config.min_reward]
    best_first = sorted(candidates, key=lambda s: -s.ranking_score)  # sorted() is stable

    if config.strategy == "local":
        target = config.keep_per_prompt * len({s.prompt_index for s in samples})
    elif config.strategy == "global":
        # the fraction is of all samples, as in the paper, not of those that survived discarding
        target = max(1, round(config.top_fraction * len(samples)))
    elif config.strategy in ("threshold", "all"):
        target = len(best_first)
    else:  # validated earlier; kept for readers
        raise ValueError(config.strategy)

    diversity = config.diversity
    similar = DiversityFilter(best_first, diversity.max_similarity, features) if (
        diversity.max_similarity is not None and features is not None and best_first) else None
    opening_cap = None
    if diversity.max_opening_share is not None and opening is not None:
        opening_cap = max(1, math.floor(diversity.max_opening_share * target))
    openings: Counter = Counter()
    per_prompt: Counter = Counter()
    kept = []
    for sample in best_first:
        if len(kept) >= target:
            break
        if config.strategy == "local" and per_prompt[sample.prompt_index] >= config.keep_per_prompt:
            continue
        if (config.strategy == "global" and config.max_per_prompt is not None
                and per_prompt[sample.prompt_index] >= config.max_per_prompt):
            continue
        if similar is not None:
            reason = similar.too_similar(sample)
            if reason:
                sample.meta[META_NOT_KEPT] = reason
                continue
        if opening_cap is not None:
            key = opening(sample)
            if openings[key] >= opening_cap:
                sample.meta[META_NOT_KEPT] = f"opening '{key}' already kept {opening_cap} times (its cap)"
                continue
            openings[key] += 1
        if similar is not None:
            similar.keep(sample)
        per_prompt[sample.prompt_index] += 1
        kept.append(sample)

    for sample in kept:
        sample.selected = True
    position = {id(s): i for i, s in enumerate(samples)}
    return sorted(kept, key=lambda s: position[id(s)])


class DiversityFilter:
    """Cosine similarity of each candidate to the samples kept so far (feature rows are unit vectors)."""

    def __init__(self, candidates: list[Sample], max_similarity: float, features: Callable[[list[Sample]], Any]):
        self.max_similarity = max_similarity
        rows = np.asarray(features(candidates), dtype=np.float64)
        self.row = {id(s): rows[i] for i, s in enumerate(candidates)}
        self.kept: list[np.ndarray] = []
        self.kept_prompts: list[int] = []

    def too_similar(self, sample: Sample) -> str | None:
        if not self.kept:
            return None
        similarities = np.stack(self.kept) @ self.row[id(sample)]
        nearest = int(np.argmax(similarities))
        if similarities[nearest] > self.max_similarity:
            return (f"similarity {similarities[nearest]:.2f} to a kept sample of prompt {self.kept_prompts[nearest]} "
                    f"(max_similarity {self.max_similarity:g})")
        return None

    def keep(self, sample: Sample) -> None:
        self.kept.append(self.row[id(sample)])
        self.kept_prompts.append(sample.prompt_index)
