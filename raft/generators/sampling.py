"""Sampling settings shared by the text generators that run outside the policy (a server, vLLM)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SamplingSettings:
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    max_new_tokens: int = 64
    max_new_tokens_range: list[int] | None = None  # [low, high): each prompt draws its own budget

    def budgets(self, count: int, rng: np.random.Generator) -> list[int]:
        """max_new_tokens of each of `count` prompts (drawn as the policy's sampler draws them)."""
        return draw_budgets(self.max_new_tokens, self.max_new_tokens_range, count, rng)


def draw_budgets(max_new_tokens: int, max_new_tokens_range, count: int, rng: np.random.Generator) -> list[int]:
    """max_new_tokens of each of `count` prompts: uniform in [low, high) when a range is set, else the fixed one.
    Every sampler draws them this way, so one seed gives the same budgets whichever samples."""
    if max_new_tokens_range:
        low, high = max_new_tokens_range
        return rng.integers(low, high, size=count).tolist()
    return [max_new_tokens] * count


def chat_messages(prompt: str, system_prompt: str | None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": prompt}]


def seed_of(seed: int, *path: int) -> int:
    """A 31-bit seed derived from `seed` and a position (servers take seeds as signed integers)."""
    return int(np.random.SeedSequence([seed, *path]).generate_state(1)[0] >> 1)
