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
from raft.interface import Ranker, Sample


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


class WeightedSum(Ranker):
    """sum_i weight_i * ranker_i(sample). Each part's score is kept in `sample.rewards[name]`."""

    def __init__(self, parts: list[tuple[Ranker, float]], name: str = "weighted_sum"):
        if not parts:
            raise RaftError("no rankers configured")
        self.parts = parts
        self.name = name

    def score(self, samples: list[Sample]) -> list[float]:
        totals = [0.0] * len(samples)
        for ranker, weight in self.parts:
            score_samples(ranker, samples)  # checks each part, so errors name the part that failed
            for i, sample in enumerate(samples):
                sample.rewards[ranker.name] = sample.reward
                totals[i] += weight * sample.reward
        return totals
