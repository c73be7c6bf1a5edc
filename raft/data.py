"""Prompt files and held-out splits, the same for every modality (each adds its builtin prompt sets)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from raft.errors import RaftError

SPLIT_SEED = 0  # held-out splits never depend on the run's seed, so runs with different seeds compare


def split_held_out(prompts: list[str], eval_size: int, source: str) -> tuple[list[str], list[str]]:
    """(training, held-out) prompts: `eval_size` of `prompts`, drawn with SPLIT_SEED, are held out (in their
    order in the file) and never trained on. `source` names the prompts' file in the error."""
    if len(prompts) <= eval_size:
        raise RaftError(f"data.prompts: '{source}' has {len(prompts)} prompts, not more than "
                        f"data.eval_size ({eval_size}) held out; lower eval_size or set data.eval_prompts")
    order = np.random.default_rng(SPLIT_SEED).permutation(len(prompts))
    held_out = set(order[:eval_size].tolist())
    return [p for i, p in enumerate(prompts) if i not in held_out], [prompts[i] for i in sorted(held_out)]


def read_column(path: str, column: str, field: str) -> list[str]:
    """Non-empty strings from a .txt (one per line), .jsonl/.json, .csv or .parquet file."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise RaftError(f"{field}: file '{path}' does not exist")
    suffix = file.suffix.lower()
    if suffix == ".txt":
        values = file.read_text().splitlines()
    else:
        formats = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
        if suffix not in formats:
            raise RaftError(f"{field}: '{path}' is not a .txt, .jsonl, .json, .csv or .parquet file")
        import datasets

        if suffix == ".jsonl":
            from raft.rundir import read_jsonl

            read_jsonl(file, what=f"{field}: ")  # a bad line is named here; datasets would not say which
        try:
            table = datasets.load_dataset(formats[suffix], data_files=str(file), split="train")
        except Exception as error:  # malformed files fail in many ways inside datasets/pyarrow
            raise RaftError(f"{field}: cannot read '{path}': {str(error).strip().splitlines()[0]}") from None
        if column not in table.column_names:
            raise RaftError(f"{field}: '{path}' has no column '{column}' (columns: {', '.join(table.column_names)})")
        values = table[column]
    values = [str(v).strip() for v in values if v is not None and str(v).strip()]
    if not values:
        raise RaftError(f"{field}: '{path}' is empty (no non-empty {'lines' if suffix == '.txt' else column + ' values'})")
    return values
