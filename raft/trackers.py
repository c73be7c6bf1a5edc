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
import os
from pathlib import Path

from raft.errors import RaftError
from raft.rundir import RunDirectory, iteration_name

# tracker -> (the module it needs, the pip extra that installs it)
KNOWN = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
         "trackio": ("trackio", "trackio"), "mlflow": ("mlflow", "mlflow")}
TABLE_ROWS = 256  # samples per iteration's table, at most
OUTPUT_CHARS = 500  # of each output, at most
IMAGES = 16  # kept images per iteration shown by tensorboard, at most


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
            elif name == "trackio":  # stored where trackio stores (TRACKIO_DIR), not in the run directory
                tracker = tracking.TrackioTracker(project, name=run_dir.path.name, embed=False, auto_log_cpu=False,
                                                  auto_log_gpu=False)
            else:
                if "MLFLOW_TRACKING_URI" not in os.environ:  # otherwise ./mlruns of the working directory
                    import mlflow

                    mlflow.set_tracking_uri((run_dir.path / "mlruns").resolve().as_uri())
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
            if tracker.name == "trackio":  # one log entry per iteration, its table with it
                import trackio

                table = trackio.Table(columns=columns, data=with_images(data, folder, trackio.Image))
                tracker.log({**scalars, **({name: table} if data else {})}, step=step)
                continue
            tracker.log(scalars, step=step)
            if not data:
                continue
            if tracker.name == "wandb":
                import wandb

                tracker.log_table(name, columns=columns, data=with_images(data, folder, wandb.Image), step=step)
            elif tracker.name == "mlflow":
                import mlflow

                mlflow.log_table({c: [r[i] for r in data] for i, c in enumerate(columns)},
                                 artifact_file=f"{name}/{iteration_name(step)}.json")
            else:  # tensorboard: its text tab renders markdown; the kept images (all, for row 0) under Images
                tracker.log({name: markdown_table(columns, data)}, step=step)
                kept = [folder / r[1] for r in data if (r[3] or step == 0) and is_image(folder, r[1])]
                if kept:
                    tracker.log_images({f"{name}/kept" if step else name: image_batch(kept[:IMAGES])}, step=step,
                                       dataformats="NHWC")

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()


def is_image(folder: Path, output: str) -> bool:
    return output.endswith(".png") and (folder / output).is_file()


def with_images(data: list[list], folder: Path, image) -> list[list]:
    """The table's rows with each output that is an image's path (diffusion) made `image(path)`."""
    return [[r[0], image(str(folder / r[1])) if is_image(folder, r[1]) else r[1], *r[2:]] for r in data]


def image_batch(paths: list[Path]):
    """The images as one uint8 NHWC array (resized to the first one's size)."""
    import numpy as np
    from PIL import Image

    first = Image.open(paths[0]).convert("RGB")
    return np.stack([np.asarray(first)] + [np.asarray(Image.open(p).convert("RGB").resize(first.size))
                                           for p in paths[1:]])


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
