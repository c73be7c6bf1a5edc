"""Rankers every modality can use: a Python callable, a weighted combination, and score checking.

Modality-specific rankers (sentiment lexicons, reward models, CLIP) live in their modality's folder.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import sys
from pathlib import Path
from typing import Callable

from raft.errors import RaftError
from raft.interface import META_REWARDS_NORMALIZED, Ranker, Sample


def check_scores(name: str, scores, count: int) -> list[float]:
    """Scores as floats, or a one-line error naming the ranker and what is wrong with its output."""
    if isinstance(scores, (str, bytes, dict)) or not hasattr(scores, "__iter__"):
        raise RaftError(f"ranker '{name}' returned a {type(scores).__name__}, not a list of numbers")
    try:
        scores = [float(s) for s in scores]
    except (TypeError, ValueError) as error:
        raise RaftError(f"ranker '{name}' returned something that is not a list of numbers ({error})") from None
    if len(scores) != count:
        raise RaftError(f"ranker '{name}' returned {len(scores)} scores for {count} samples")
    bad = sum(1 for s in scores if not math.isfinite(s))
    if bad:
        raise RaftError(f"ranker '{name}' returned NaN or infinite scores for {bad} of {count} samples")
    return scores


def score_samples(ranker: Ranker, samples: list[Sample]) -> None:
    """Score every sample in one batched call and store the reward on it."""
    if not samples:
        return
    try:
        raw = ranker.score(samples)
    except RaftError:
        raise
    except Exception as error:  # a user's ranker may fail in any way; name it and keep the run intact
        raise RaftError(f"ranker '{ranker.name}' raised {type(error).__name__}: {error}") from error
    for sample, score in zip(samples, check_scores(ranker.name, raw, len(samples))):
        sample.reward = score


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text[:200] if text else type(error).__name__


def load_callable(spec: str, what: str = "function") -> Callable:
    """`package.module:function` or `path/to/file.py:function` -> the function."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise RaftError(f"{what} '{spec}' must look like module:function or path/to/file.py:function")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise RaftError(f"{what} '{spec}': file '{path}' does not exist")
            # a name of its own: a file called json.py must not replace the json module for everyone else
            unique = f"raft_user_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]}_{path.stem}"
            module_spec = importlib.util.spec_from_file_location(unique, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[unique] = module  # what dataclasses and pickling of the module's objects look up
            try:
                module_spec.loader.exec_module(module)
            except BaseException:
                sys.modules.pop(unique, None)
                raise
        else:
            module = importlib.import_module(module_name)
    except RaftError:
        raise
    except ImportError as error:
        raise RaftError(f"{what} '{spec}': cannot import '{module_name}' ({_one_line(error)})") from None
    except Exception as error:  # a syntax error, or anything the module raises while it loads
        raise RaftError(f"{what} '{spec}': importing '{module_name}' raised {type(error).__name__}: "
                        f"{_one_line(error)}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise RaftError(f"{what} '{spec}': '{module_name}' has no callable '{attr}'")
    return fn


class CallableRanker(Ranker):
    """Any Python function `fn(prompts, outputs) -> list[float]`, given as `module:function`."""

    def __init__(self, spec: str, name: str | None = None):
        self.fn = load_callable(spec, "ranker")
        self.name = name or spec

    def score(self, samples: list[Sample]) -> list[float]:
        return self.fn([s.prompt for s in samples], [s.output for s in samples])


class TimeLimited(Ranker):
    """A ranker whose every scoring call must end within `seconds` (config ranker_timeout_s): a hung reward server
    or user function stops the run in one line instead of holding it forever. The call runs in a daemon thread,
    left behind when it overruns (the process then ends with the error)."""

    def __init__(self, ranker: Ranker, seconds: float):
        self.ranker, self.seconds, self.name = ranker, seconds, ranker.name

    def score(self, samples: list[Sample]) -> list[float]:
        import threading

        import torch

        result: dict = {}
        grad = torch.is_grad_enabled()

        def call():
            try:
                with torch.set_grad_enabled(grad):
                    result["scores"] = self.ranker.score(samples)
            except BaseException as error:  # re-raised in the caller's thread
                result["error"] = error

        worker = threading.Thread(target=call, name=f"ranker {self.name}", daemon=True)
        worker.start()
        worker.join(self.seconds)
        if worker.is_alive():
            raise RaftError(f"ranker '{self.name}' gave no scores for {len(samples)} samples within ranker_timeout_s "
                            f"({self.seconds:g} s)")
        if "error" in result:
            raise result["error"]
        return result["scores"]


def with_timeout(ranker: Ranker, seconds: float | None) -> Ranker:
    return ranker if seconds is None else TimeLimited(ranker, seconds)


AGGREGATIONS = ("sum", "zscore", "rank")


def normalize(scores: list[float], aggregation: str) -> list[float]:
    """One ranker's scores of a batch, as aggregation combines them.

    sum: as they are; zscore: (score - mean) / std over the batch (0 for all when the std is 0); rank: the score's
    rank in the batch scaled to [0, 1] (0 the lowest, 1 the highest, ties sharing their mean rank; 0.5 for a batch
    of one)."""
    if aggregation == "sum":
        return list(scores)
    n = len(scores)
    if aggregation == "zscore":
        mean = sum(scores) / n
        std = math.sqrt(sum((s - mean) ** 2 for s in scores) / n)
        return [(s - mean) / std if std > 0 else 0.0 for s in scores]
    if n == 1:
        return [0.5]
    order = sorted(range(n), key=lambda i: scores[i])
    ranks = [0.0] * n
    start = 0
    while start < n:  # runs of equal scores share their mean rank
        end = start
        while end + 1 < n and scores[order[end + 1]] == scores[order[start]]:
            end += 1
        for position in range(start, end + 1):
            ranks[order[position]] = (start + end) / 2 / (n - 1)
        start = end + 1
    return ranks


class WeightedSum(Ranker):
    """Combines rankers: sum_i weight_i * ranker_i(sample) (aggregation sum), or the same sum of each ranker's
    scores z-scored over the batch (zscore), or the weighted average of each ranker's rank in the batch in [0, 1]
    (rank). Each part's raw score is kept in `sample.rewards[name]`; with zscore or rank its normalized score in
    `sample.meta[META_REWARDS_NORMALIZED][name]` (both are written to samples.jsonl)."""

    def __init__(self, parts: list[tuple[Ranker, float]], name: str = "weighted_sum", aggregation: str = "sum"):
        if not parts:
            raise RaftError("no rankers configured")
        if aggregation not in AGGREGATIONS:
            raise RaftError(f"unknown ranker_aggregation '{aggregation}' (choose from {', '.join(AGGREGATIONS)})")
        self.parts = parts
        self.name = name
        self.aggregation = aggregation

    def score(self, samples: list[Sample]) -> list[float]:
        totals = [0.0] * len(samples)
        for ranker, weight in self.parts:
            score_samples(ranker, samples)  # checks each part, so errors name the part that failed
            raw = [sample.reward for sample in samples]
            for i, (sample, value) in enumerate(zip(samples, normalize(raw, self.aggregation))):
                sample.rewards[ranker.name] = sample.reward
                if self.aggregation != "sum":
                    sample.meta.setdefault(META_REWARDS_NORMALIZED, {})[ranker.name] = value
                totals[i] += weight * value
        if self.aggregation == "rank":  # a weighted average of ranks: in [0, 1] whatever the weights
            total_weight = sum(weight for _, weight in self.parts)
            totals = [t / total_weight for t in totals] if total_weight else totals
        return totals


def combine(parts: list[tuple[Ranker, float]]) -> Ranker:
    """A modality's configured rankers with their weights as one ranker: a lone one of weight 1 as it is, else
    their weighted sum."""
    if len(parts) == 1 and parts[0][1] == 1.0:
        return parts[0][0]
    return WeightedSum(parts)


def with_aggregation(ranker: Ranker, aggregation: str) -> Ranker:
    """The modality's ranker under `ranker_aggregation`: a lone ranker is wrapped too under zscore or rank, so
    its raw and normalized scores are both recorded."""
    if aggregation == "sum":
        return ranker
    if isinstance(ranker, WeightedSum):
        return WeightedSum(ranker.parts, ranker.name, aggregation)
    return WeightedSum([(ranker, 1.0)], aggregation=aggregation)
