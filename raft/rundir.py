"""The run directory: a self-describing record of a run, written so that a kill loses nothing finished.

    <run_dir>/
      config.yaml                  resolved config (what `--resume` reads back)
      state.json                   {"completed_iteration": N}: the commit point of iteration N
      metrics.jsonl                one row per completed iteration; row 0 is the starting policy
      metrics.png                  the curves of metrics.jsonl
      iterations/iter-0001/
        samples.jsonl              every sample: prompt, output, reward(s), discard reason, selected, provenance
        selected.jsonl             the kept set, as fine-tuned on
        eval_samples.jsonl         the policy's held-out samples and their rewards
      checkpoints/iter-0001/       weights or adapter (safetensors) and optimizer state if carried

Every file and folder is written under a temporary name and renamed into place; state.json is written
last, so an iteration either is complete on disk or is redone from the previous one on resume.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable

from raft.errors import RaftError


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def jsonable(value: Any) -> Any:
    """Plain JSON data; non-finite floats become null so any JSON reader (pyarrow too) accepts the file."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def to_jsonl(rows: Iterable[dict]) -> str:
    return "".join(json.dumps(jsonable(row), ensure_ascii=False) + "\n" for row in rows)


def iteration_name(iteration: int) -> str:
    return f"iter-{iteration:04d}"


class RunDirectory:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    # ---- opening

    def ensure_new(self) -> None:
        if self.path.exists() and any(self.path.iterdir()):
            raise RaftError(f"run directory '{self.path}' already exists; pass --resume {self.path} to continue it")

    def initialize(self, config_yaml: str) -> None:
        self.ensure_new()
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path / "config.yaml", config_yaml)

    def write_config(self, config_yaml: str) -> None:
        atomic_write_text(self.path / "config.yaml", config_yaml)

    # ---- state

    @property
    def completed_iteration(self) -> int | None:
        """The last iteration committed to disk (0: only the starting evaluation), or None."""
        state = self.path / "state.json"
        if not state.is_file():
            return None
        return int(json.loads(state.read_text())["completed_iteration"])

    def checkpoint_dir(self, iteration: int) -> Path:
        return self.path / "checkpoints" / iteration_name(iteration)

    def _state(self) -> dict:
        state = self.path / "state.json"
        return json.loads(state.read_text()) if state.is_file() else {}

    def latest_checkpoint(self) -> Path | None:
        """The checkpoint of the run's model: the last completed iteration's, unless the collapse guard rolled
        that iteration back (then the last good one's); None for the starting model."""
        state = self._state()
        done = state.get("checkpoint_iteration", state.get("completed_iteration"))
        if not done:
            return None
        path = self.checkpoint_dir(done)
        if not path.is_dir():
            raise RaftError(f"cannot resume: checkpoint '{path}' of completed iteration {done} is missing")
        return path

    def metrics(self) -> list[dict]:
        path = self.path / "metrics.jsonl"
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def discard_unfinished(self) -> None:
        """Remove what an interrupted iteration left behind (anything past the commit point)."""
        done = self.completed_iteration
        done = -1 if done is None else done
        for folder in (self.path / "iterations", self.path / "checkpoints"):
            if not folder.is_dir():
                continue
            for entry in folder.iterdir():
                number = entry.name.removeprefix("iter-").removesuffix(".tmp")
                if entry.name.endswith(".tmp") or not number.isdigit() or int(number) > done:
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        rows = [row for row in self.metrics() if row["iteration"] <= done]
        if (self.path / "metrics.jsonl").is_file():
            atomic_write_text(self.path / "metrics.jsonl", to_jsonl(rows))

    # ---- committing an iteration

    def commit_iteration(
        self,
        iteration: int,
        write_files: Callable[[Path], None],
        metrics_row: dict,
        save_checkpoint: Callable[[Path], None] | None,
        keep_checkpoints: int,
        before_commit: Callable[[], None] = lambda: None,
    ) -> None:
        """Write iteration `iteration` (its files, checkpoint, metrics row), then mark it complete."""
        self._write_folder(self.path / "iterations" / iteration_name(iteration), write_files)
        if save_checkpoint is not None:
            self._write_folder(self.checkpoint_dir(iteration), save_checkpoint)
        rows = [row for row in self.metrics() if row["iteration"] < iteration] + [metrics_row]
        atomic_write_text(self.path / "metrics.jsonl", to_jsonl(rows))
        state = {"completed_iteration": iteration}
        if save_checkpoint is None and iteration > 0:  # rolled back: the model stays the last saved one
            state["checkpoint_iteration"] = self._state().get("checkpoint_iteration", self.completed_iteration)
        before_commit()
        atomic_write_text(self.path / "state.json", json.dumps(state) + "\n")
        self._prune_checkpoints(keep_checkpoints)

    def _write_folder(self, final: Path, fill: Callable[[Path], Any]) -> None:
        tmp = final.with_name(final.name + ".tmp")
        for stale in (tmp, final):
            if stale.exists():
                shutil.rmtree(stale)
        tmp.mkdir(parents=True)
        fill(tmp)
        os.replace(tmp, final)

    def _prune_checkpoints(self, keep: int) -> None:
        folder = self.path / "checkpoints"
        if not folder.is_dir():
            return
        checkpoints = sorted(p for p in folder.iterdir() if p.name.startswith("iter-") and not p.name.endswith(".tmp"))
        for old in checkpoints[:-keep]:
            shutil.rmtree(old)
