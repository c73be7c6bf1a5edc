"""Pre-generated samples as a generator: a table of (prompt, response) rows, several rows per prompt.

Typical sources are samples written by another system (a bigger model, human demonstrations, an earlier
run's samples.jsonl). Each iteration draws K of a prompt's rows without replacement, so a file with K rows
per prompt yields all of them, in a seeded order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from raft.errors import RaftError
from raft.interface import META_GENERATOR, META_PROMPT_SENT, META_SETTINGS, Generator, Sample

FILE_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def load_table(source: str, split: str, what: str):
    """A `datasets.Dataset` from a data file, a folder written by `save_to_disk`, or a hub dataset id."""
    import datasets

    path = Path(source).expanduser()
    looks_local = source.startswith((".", "/", "~")) or source.count("/") > 1 or path.suffix.lower() in FILE_FORMATS
    if not path.exists() and looks_local:  # hub ids look like org/name
        raise RaftError(f"{what}: file '{source}' does not exist")
    try:
        if path.is_file():
            if path.suffix.lower() not in FILE_FORMATS:
                raise RaftError(f"{what}: '{source}' is not a {', '.join(FILE_FORMATS)} file")
            if path.suffix.lower() == ".jsonl":
                from raft.rundir import read_jsonl

                read_jsonl(path, what=f"{what}: ")  # a bad line is named here; datasets would not say which
            return datasets.load_dataset(FILE_FORMATS[path.suffix.lower()], data_files=str(path), split="train")
        if path.is_dir():
            table = datasets.load_from_disk(str(path))
            if isinstance(table, datasets.DatasetDict):
                if split not in table:
                    raise RaftError(f"{what}: '{source}' has no split '{split}' (splits: {', '.join(table)})")
                table = table[split]
            return table
        return datasets.load_dataset(source, split=split)  # a hub dataset id
    except RaftError:
        raise
    except Exception as error:  # malformed files and unreachable hubs fail in many ways inside datasets/pyarrow
        lines = str(error).strip().splitlines()
        raise RaftError(f"{what}: cannot read '{source}': {lines[0] if lines else type(error).__name__}") from None


class FileSampler(Generator):
    """Serves K rows per prompt from a table of pre-generated samples."""

    def __init__(self, source: str, prompt_field: str = "prompt", response_field: str = "response",
                 split: str = "train", name: str = "file", prompt_key: Callable[[str], str] = lambda p: p,
                 what: str = "file sampler"):
        """`prompt_key` maps a prompt of the file to the prompt the loop asks for (e.g. applies the task's
        template), so files can hold the raw prompts, like prompt files."""
        self.name, self.source, self.what = name, source, what
        table = load_table(source, split, what)
        missing = [c for c in (prompt_field, response_field) if c not in table.column_names]
        if missing:
            raise RaftError(f"{what}: '{source}' has no column '{missing[0]}' (columns: {', '.join(table.column_names)})")
        self.rows: dict[str, list[tuple[int, str]]] = {}
        for row, (prompt, response) in enumerate(zip(table[prompt_field], table[response_field])):
            if prompt is None or response is None:
                continue
            self.rows.setdefault(prompt_key(str(prompt).strip()), []).append((row, str(response).strip()))
        if not self.rows:
            raise RaftError(f"{what}: '{source}' has no rows with both a {prompt_field} and a {response_field}")

    @property
    def prompts(self) -> list[str]:
        """The prompts the file has samples for, in file order."""
        return list(self.rows)

    def generate(self, prompts: list[str], samples_per_prompt: int, seed: int) -> list[Sample]:
        rng = np.random.default_rng(seed)
        samples = []
        for index, prompt in enumerate(prompts):
            rows = self.rows.get(prompt)
            if rows is None:
                raise RaftError(f"{self.what}: '{self.source}' has no samples for the prompt {_short(prompt)}")
            if len(rows) < samples_per_prompt:
                raise RaftError(f"{self.what}: '{self.source}' has {len(rows)} samples for the prompt {_short(prompt)}, "
                                f"fewer than the {samples_per_prompt} asked for")
            for choice in rng.choice(len(rows), size=samples_per_prompt, replace=False).tolist():
                row, response = rows[choice]
                samples.append(Sample(
                    prompt_index=index,
                    prompt=prompt,
                    output=response,
                    meta={META_GENERATOR: self.name, META_PROMPT_SENT: prompt,
                          META_SETTINGS: {"source": self.source, "row": row}},
                ))
        return samples


def _short(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")
