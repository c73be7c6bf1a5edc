"""Experiment trackers through accelerate's tracker classes: tensorboard (default, RUN/tensorboard), wandb, trackio,
mlflow.

Every row of metrics.jsonl is logged at its iteration (row 0: the starting policy), and with it a table of the
iteration's samples: prompt, output (an image's path for diffusion runs), reward, per-ranker rewards, kept.
Trackers read what the run directory committed, after each commit, on the main process only; a resumed run logs
from the iteration after its last completed one.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

from raft.errors import RaftError
from raft.rundir import RunDirectory, iteration_name

# tracker -> (the module it needs, the pip extra that installs it)
KNOWN = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
         "trackio": ("trackio", "trackio"), "mlflow": ("mlflow", "mlflow")}
TABLE_ROWS = 256  # samples per iteration's table, at most
OUTPUT_CHARS = 500  # of each output, at most


def check_trackers(names: list[str]) -> None:
    """One-line errors for an unknown tracker or one whose package is not installed (before anything runs)."""
    for name in names:
        if name not in KNOWN:
            raise RaftError(f"trackers: unknown tracker '{name}' (choose from {', '.join(KNOWN)})")
        module, extra = KNOWN[name]
        if importlib.util.find_spec(module) is None:
            raise RaftError(f"trackers: '{name}' needs the {module} package (pip install 'raft-align[{extra}]')")


class Trackers:
    """The run's trackers; `sync()` logs every committed iteration not logged yet."""

    def __init__(self, names: list[str], run_dir: RunDirectory, project: str = "raft"):
        check_trackers(names)
        from accelerate import tracking

        self.run_dir = run_dir
        self.logged = run_dir.completed_iteration if run_dir.completed_iteration is not None else -1
        self.trackers = []
        for name in dict.fromkeys(names):
            if name == "tensorboard":
                tracker = tracking.TensorBoardTracker("tensorboard", run_dir.path)
            elif name == "wandb":
                tracker = tracking.WandBTracker(project, name=run_dir.path.name)
            elif name == "trackio":
                tracker = tracking.TrackioTracker(project, name=run_dir.path.name)
            else:
                tracker = tracking.MLflowTracker(project, logging_dir=str(run_dir.path / "mlruns"),
                                                 run_name=run_dir.path.name)
            tracker.start()
            self.trackers.append(tracker)

    def sync(self) -> None:
        for row in self.run_dir.metrics():
            if row["iteration"] > self.logged:
                self.log_iteration(row)
                self.logged = row["iteration"]

    def log_iteration(self, row: dict) -> None:
        step = row["iteration"]
        scalars = {k: v for k, v in row.items() if k != "iteration" and isinstance(v, (int, float))
                   and not isinstance(v, bool) and math.isfinite(v)}
        folder = self.run_dir.path / "iterations" / iteration_name(step)
        name = "samples" if step > 0 else "eval_samples"
        columns, data = sample_table(folder / f"{name}.jsonl")
        for tracker in self.trackers:
            tracker.log(scalars, step=step)
            if not data:
                continue
            if tracker.name == "wandb":
                tracker.log_table(name, columns=columns, data=data, step=step)
            elif tracker.name == "mlflow":
                import mlflow

                mlflow.log_table({c: [r[i] for r in data] for i, c in enumerate(columns)},
                                 artifact_file=f"{name}/{iteration_name(step)}.json")
            else:  # tensorboard (its text tab renders markdown), trackio
                tracker.log({name: markdown_table(columns, data)}, step=step)

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()


def sample_table(path: Path) -> tuple[list[str], list[list]]:
    """Columns and rows of the samples in `path`: prompt, output, reward, kept, then each ranker's reward."""
    if not path.is_file():
        return [], []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()][:TABLE_ROWS]
    parts = list(dict.fromkeys(k for r in records for k in (r.get("rewards") or {})))
    columns = ["prompt", "output", "reward", "kept", *[f"reward/{p}" for p in parts]]
    data = [[str(r["prompt"]), str(r["output"])[:OUTPUT_CHARS], r.get("reward"), bool(r.get("selected")),
             *[(r.get("rewards") or {}).get(p) for p in parts]] for r in records]
    return columns, data


def markdown_table(columns: list[str], data: list[list]) -> str:
    """A markdown table (what tensorboard's text tab renders)."""

    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.4f}"
        return " ".join(str(value).replace("|", "\\|").splitlines())  # one table row per sample

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in data]
    return "\n".join(lines)
