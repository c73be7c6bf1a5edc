"""Callable rankers used by the tests (loaded by path, as a user's would be)."""

import math
import os

_calls = 0


def vowel_share(prompts, responses):
    return [sum(c in "aeiou" for c in r) / max(1, len(r)) for r in responses]


def broken_from_call(prompts, responses):
    """vowel_share until call RAFT_TEST_BREAK_AT, then breaks the way RAFT_TEST_BREAK says."""
    global _calls
    _calls += 1
    if _calls < int(os.environ.get("RAFT_TEST_BREAK_AT", "1000000")):
        return vowel_share(prompts, responses)
    mode = os.environ.get("RAFT_TEST_BREAK", "raise")
    if mode == "raise":
        raise ValueError("reward server unavailable")
    if mode == "hang":  # a reward server that never answers
        import time

        time.sleep(3600)
    if mode == "nan":
        return [math.nan] + vowel_share(prompts, responses)[1:]
    return vowel_share(prompts, responses)[:-1]  # one score short
