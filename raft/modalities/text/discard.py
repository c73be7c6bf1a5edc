"""Discard rules for text samples, applied before selection (e.g. against LMFlow's '#' reward hack)."""

from __future__ import annotations

import re

from raft.errors import ConfigError
from raft.interface import DiscardRule
from raft.modalities.text.config import TextDiscardConfig


def repeated_ngram_fraction(text: str, n: int = 3) -> float:
    words = text.split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def build_discard_rules(config: TextDiscardConfig) -> list[DiscardRule]:
    rules: list[DiscardRule] = []
    if config.min_words > 0:
        rules.append(lambda s: f"fewer than {config.min_words} words" if len(s.output.split()) < config.min_words else None)
    if config.max_words is not None:
        rules.append(lambda s: f"more than {config.max_words} words" if len(s.output.split()) > config.max_words else None)
    for index, pattern in enumerate(config.patterns):
        try:
            compiled = re.compile(pattern)
        except re.error as error:
            raise ConfigError(f"config: discard.patterns.{index} is not a valid regular expression ({error})") from None
        rules.append(lambda s, c=compiled: f"matches /{c.pattern}/" if c.search(s.output) else None)
    if config.max_repeated_ngram_fraction is not None:
        limit = config.max_repeated_ngram_fraction
        rules.append(lambda s: "repetitive" if repeated_ngram_fraction(s.output) > limit else None)
    return rules
