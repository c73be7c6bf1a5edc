"""`raft export RUN --format samples|sft|preferences --out DIR`: a run's samples as a Hugging Face dataset.

    DIR/README.md                               a dataset card
    DIR/data/train-00000-of-00001.parquet       the rows (images embedded as datasets.Image): load_dataset(DIR)
    DIR/arrow/                                  the same rows, Dataset.save_to_disk (datasets.load_from_disk)

Formats:
  samples      every sample of every completed iteration: prompt, output, reward, per-ranker rewards, kept or not,
               discard reason, provenance
  sft          the kept set, as fine-tuned on: prompt / completion, and the chat `messages`
  preferences  West-of-N pairs: for each prompt of each iteration, the best and the worst of its N scored samples
               (discarded ones left out) as chosen / rejected, both rewards and the margin; pairs whose margin is
               below `min_margin` (or zero) are left out. The format of TRL's DPOTrainer and RewardTrainer.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml

from raft.errors import RaftError
from raft.rundir import RunDirectory, iteration_name

FORMATS = ("samples", "sft", "preferences")
PARQUET = "data/train-00000-of-00001.parquet"


def read_rows(run: RunDirectory, name: str) -> list[dict]:
    """The rows of `<name>.jsonl` of every completed training iteration (1..N), in order."""
    done = run.completed_iteration or 0
    rows = []
    for iteration in range(1, done + 1):
        path = run.path / "iterations" / iteration_name(iteration) / f"{name}.jsonl"
        if path.is_file():
            rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows


def open_run(path: str | Path) -> tuple[RunDirectory, dict]:
    run = RunDirectory(path)
    if not run.path.is_dir():
        raise RaftError(f"cannot export: run directory '{path}' does not exist")
    if not (run.path / "config.yaml").is_file():
        raise RaftError(f"cannot export: '{path}' is not a run directory (no config.yaml)")
    config = yaml.safe_load((run.path / "config.yaml").read_text()) or {}
    return run, config


def build_rows(run: RunDirectory, config: dict, fmt: str, min_margin: float = 0.0,
               conversational: bool = False) -> list[dict]:
    """The dataset's rows; image outputs become absolute paths (columns listed in image_columns)."""
    if fmt not in FORMATS:
        raise RaftError(f"unknown export format '{fmt}' (choose from {', '.join(FORMATS)})")
    samples = read_rows(run, "samples")
    if not samples:
        raise RaftError(f"cannot export: run '{run.path}' has no samples (no training iteration completed)")
    images = config.get("modality") == "diffusion"

    def output(row: dict) -> Any:
        value = row["output"]
        if images and isinstance(value, str):  # a path relative to its iteration folder
            return str(run.path / "iterations" / iteration_name(row["iteration"]) / value)
        return value

    def user(text: str) -> Any:
        return [{"role": "user", "content": text}] if conversational else text

    def assistant(value: Any) -> Any:
        return [{"role": "assistant", "content": value}] if conversational and not images else value

    if fmt == "samples":
        return [{**row, "output": output(row), "kept": bool(row.get("selected"))} for row in samples]
    if fmt == "sft":
        rows = []
        for row in read_rows(run, "selected"):
            item = {"prompt": user(row["prompt"]), "completion": assistant(output(row))}
            if not images and not conversational:
                item["messages"] = [{"role": "user", "content": row["prompt"]},
                                    {"role": "assistant", "content": row["output"]}]
            rows.append({**item, "reward": row.get("reward"), "iteration": row["iteration"],
                         "prompt_index": row["prompt_index"]})
        if not rows:
            raise RaftError(f"cannot export: run '{run.path}' kept no samples")
        return rows
    return west_of_n(samples, output, user, assistant, min_margin)


def west_of_n(samples: list[dict], output, user, assistant, min_margin: float) -> list[dict]:
    """Per (iteration, prompt): the best and the worst scored, non-discarded sample as chosen / rejected."""
    groups: dict[tuple[int, int], list[dict]] = {}
    for row in samples:
        reward = row.get("reward")
        if row.get("discard_reason") is None and isinstance(reward, (int, float)):
            groups.setdefault((row["iteration"], row["prompt_index"]), []).append(row)
    pairs = []
    for (iteration, prompt_index), group in groups.items():
        best = max(group, key=lambda r: r["reward"])  # the first of equals: the order samples were drawn in
        worst = min(group, key=lambda r: r["reward"])
        margin = best["reward"] - worst["reward"]
        if margin <= 0 or margin < min_margin or best["output"] == worst["output"]:
            continue
        pairs.append({"prompt": user(best["prompt"]), "chosen": assistant(output(best)),
                      "rejected": assistant(output(worst)), "chosen_reward": best["reward"],
                      "rejected_reward": worst["reward"], "margin": margin, "iteration": iteration,
                      "prompt_index": prompt_index, "candidates": len(group)})
    return pairs


def to_dataset(rows: list[dict], image_columns: list[str]):
    """A datasets.Dataset of `rows`: every key of any row a column; values arrow cannot type consistently
    (a provenance field that is a number in one row and text in another) become JSON text; image paths become
    datasets.Image with the bytes embedded, so the dataset does not depend on the run directory."""
    import datasets
    import pyarrow as pa

    datasets.disable_progress_bars()

    columns: dict[str, list] = {}
    for row in rows:
        for key in row:
            columns.setdefault(key, [])
    for key, values in columns.items():
        values.extend(row.get(key) for row in rows)
        if key in image_columns:
            columns[key] = [None if v is None else {"bytes": Path(v).read_bytes(), "path": Path(v).name}
                            for v in values]
            continue
        try:
            pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            columns[key] = [None if v is None else json.dumps(v) for v in values]
    dataset = datasets.Dataset.from_dict(columns)
    for key in image_columns:
        if key in columns:
            dataset = dataset.cast_column(key, datasets.Image())
    return dataset


def export_run(run_path: str | Path, fmt: str, out: str | Path, min_margin: float = 0.0,
               conversational: bool = False) -> Path:
    """Writes the dataset of `fmt` from the run in `run_path` to `out`; returns `out`."""
    if fmt not in FORMATS:
        raise RaftError(f"unknown export format '{fmt}' (choose from {', '.join(FORMATS)})")
    if min_margin < 0:
        raise RaftError(f"--min-margin must be >= 0, got {min_margin:g}")
    run, config = open_run(run_path)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RaftError(f"cannot export: '{out}' already exists and is not empty")
    rows = build_rows(run, config, fmt, min_margin, conversational)
    if not rows:
        raise RaftError(f"cannot export: no preference pair of run '{run.path}' has a margin >= {min_margin:g}")
    images = config.get("modality") == "diffusion"
    image_columns = {"samples": ["output"], "sft": ["completion"], "preferences": ["chosen", "rejected"]}[fmt]
    dataset = to_dataset(rows, image_columns if images else [])
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "data").mkdir(parents=True)
    dataset.to_parquet(str(tmp / PARQUET))
    dataset.save_to_disk(str(tmp / "arrow"))
    (tmp / "README.md").write_text(dataset_card(run, config, fmt, dataset, min_margin))
    if out.exists():
        out.rmdir()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out)
    return out


def dataset_card(run: RunDirectory, config: dict, fmt: str, dataset, min_margin: float) -> str:
    # no `configs:` header: datasets would key its cache on that text alone, and serve a stale copy after a re-export
    # to a folder of the same name; data/train-*.parquet is found by its default patterns
    header = {"tags": ["raft", fmt]}
    what = {
        "samples": "every sample of every completed iteration, with its reward(s) and whether it was kept (`kept`)",
        "sft": "the kept samples (what RAFT fine-tuned on) as prompt / completion",
        "preferences": "West-of-N pairs: per prompt and iteration, the best (chosen) and the worst (rejected) of "
                       f"the N scored samples, margin >= {min_margin:g} and > 0",
    }[fmt]
    model = (config.get("model") or {}).get("name_or_path", "?")
    return (f"---\n{yaml.safe_dump(header, sort_keys=False)}---\n\n# raft export: {fmt}\n\n"
            f"From the {config.get('modality', '?')} run `{run.path}` (model `{model}`, "
            f"{run.completed_iteration} iterations): {what}. {len(dataset)} rows.\n\n"
            f"Columns: {', '.join(f'`{c}`' for c in dataset.column_names)}.\n\n"
            "```python\nimport datasets\n"
            "ds = datasets.load_dataset(\"DIR\", split=\"train\")  # or datasets.load_from_disk(\"DIR/arrow\")\n```\n")
