"""Selection of the kept set from scored samples, and the discard rules that run before it."""

from __future__ import annotations

import math

from raft.config import SelectionConfig
from raft.interface import DiscardRule, Sample


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


def select(samples: list[Sample], config: SelectionConfig) -> list[Sample]:
    """Mark and return the kept samples. Discarded samples and those below `min_reward` never qualify.

    Ties keep the earlier sample, so selection is deterministic.
    """
    candidates = [s for s in samples if s.discard_reason is None and not math.isnan(s.reward)]
    if config.min_reward is not None:
        candidates = [s for s in candidates if s.reward >= config.min_reward]
    best_first = sorted(candidates, key=lambda s: -s.reward)  # sorted() is stable

    if config.strategy == "local":
        taken: dict[int, int] = {}
        kept = []
        for sample in best_first:
            if taken.get(sample.prompt_index, 0) < config.keep_per_prompt:
                taken[sample.prompt_index] = taken.get(sample.prompt_index, 0) + 1
                kept.append(sample)
    elif config.strategy == "global":
        # the fraction is of all samples, as in the paper, not of those that survived discarding
        kept = best_first[: max(1, round(config.top_fraction * len(samples)))]
    elif config.strategy in ("threshold", "all"):
        kept = best_first
    else:  # validated earlier; kept for readers
        raise ValueError(config.strategy)

    for sample in kept:
        sample.selected = True
    position = {id(s): i for i, s in enumerate(samples)}
    return sorted(kept, key=lambda s: position[id(s)])
