"""ranker_aggregation: sum, zscore (normalize-then-sum over the batch) and rank (rank-average), with each ranker's
raw and normalized score recorded per sample."""

import json
import math

import pytest

import raft
from raft.errors import RaftError
from raft.interface import Ranker, Sample
from raft.rankers import WeightedSum, normalize, with_aggregation

from conftest import REWARDS, tiny_overrides


class Fixed(Ranker):
    def __init__(self, name, scores):
        self.name, self.scores = name, scores

    def score(self, samples):
        return self.scores[: len(samples)]


def batch(n):
    return [Sample(prompt_index=0, prompt="p", output=f"o{i}") for i in range(n)]


def test_normalize_zscore_and_rank():
    z = normalize([1.0, 2.0, 3.0, 6.0], "zscore")
    assert sum(z) == pytest.approx(0) and sum(v * v for v in z) / 4 == pytest.approx(1)
    assert z == pytest.approx([(x - 3) / math.sqrt(3.5) for x in [1, 2, 3, 6]])
    assert normalize([5.0, 5.0], "zscore") == [0.0, 0.0]
    assert normalize([30.0, 10.0, 20.0, 20.0], "rank") == pytest.approx([1.0, 0.0, 0.5, 0.5])
    assert normalize([7.0], "rank") == [0.5]
    assert normalize([3.0, 1.0], "sum") == [3.0, 1.0]


def test_zscore_and_rank_stop_one_scale_dominating_and_record_both_scores():
    # `big` orders the samples 0 < 1 < 2 < 3 in steps of 1; `small` orders them the other way in steps of 0.2. The
    # plain sum follows `big`'s scale whatever the weights; zscore and rank put both on one scale, so weights decide.
    big = Fixed("big", [1000.0, 1001.0, 1002.0, 1003.0])
    small = Fixed("small", [0.6, 0.4, 0.2, 0.0])
    summed = batch(4)
    totals = WeightedSum([(big, 1.0), (small, 1.0)]).score(summed)
    assert max(range(4), key=totals.__getitem__) == 3  # the big scale wins
    assert all("rewards_normalized" not in s.meta for s in summed)

    zs = batch(4)
    totals = WeightedSum([(big, 1.0), (small, 2.0)], aggregation="zscore").score(zs)
    assert max(range(4), key=totals.__getitem__) == 0  # weight 2 on small: small's order wins
    assert [s.rewards["big"] for s in zs] == [1000.0, 1001.0, 1002.0, 1003.0]  # raw kept
    assert [s.meta["rewards_normalized"]["small"] for s in zs] == pytest.approx(normalize(small.scores, "zscore"))
    assert totals == pytest.approx([b + 2 * s for b, s in zip(normalize(big.scores, "zscore"),
                                                                normalize(small.scores, "zscore"))])

    ranked = batch(4)
    totals = WeightedSum([(big, 1.0), (small, 3.0)], aggregation="rank").score(ranked)
    assert totals == pytest.approx([(r_b + 3 * r_s) / 4 for r_b, r_s in zip([0, 1 / 3, 2 / 3, 1], [1, 2 / 3, 1 / 3, 0])])
    assert all(0 <= t <= 1 for t in totals)


def test_a_lone_ranker_is_wrapped_only_when_normalized():
    lone = Fixed("lone", [2.0, 4.0])
    assert with_aggregation(lone, "sum") is lone
    wrapped = with_aggregation(lone, "zscore")
    samples = batch(2)
    assert wrapped.score(samples) == pytest.approx([-1.0, 1.0])
    assert [s.rewards["lone"] for s in samples] == [2.0, 4.0]
    assert with_aggregation(WeightedSum([(lone, 1.0)]), "rank").aggregation == "rank"
    with pytest.raises(RaftError, match="unknown ranker_aggregation 'mean'"):
        WeightedSum([(lone, 1.0)], aggregation="mean")


def test_a_run_records_raw_and_normalized_scores(tiny_model_dir, prompt_file, tmp_path):
    overrides = tiny_overrides(tiny_model_dir, prompt_file, tmp_path / "run") + [
        "iterations=1", "trackers=[]", "ranker_aggregation=zscore",
        f"rankers=[{{kind: callable, function: '{REWARDS}:vowel_share', name: vowels, weight: 1.0}},"
        " {kind: lexicon, lexicon: vader, name: vader, weight: 0.5}]"]
    run_dir = raft.run(raft.load_config("text", overrides=overrides))
    samples = [json.loads(l) for l in (run_dir / "iterations/iter-0001/samples.jsonl").read_text().splitlines()]
    assert len(samples) == 9
    for name in ("vowels", "vader"):
        raw = [s["rewards"][name] for s in samples]
        assert [s["rewards_normalized"][name] for s in samples] == pytest.approx(normalize(raw, "zscore"))
    assert [s["reward"] for s in samples] == pytest.approx(
        [s["rewards_normalized"]["vowels"] + 0.5 * s["rewards_normalized"]["vader"] for s in samples])
    vowels = [sum(c in "aeiou" for c in s["output"]) / max(1, len(s["output"])) for s in samples]
    assert [s["rewards"]["vowels"] for s in samples] == pytest.approx(vowels)
    held_out = [json.loads(l) for l in (run_dir / "iterations/iter-0001/eval_samples.jsonl").read_text().splitlines()]
    row = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()][1]
    assert row["eval/reward/vowels"] == pytest.approx(sum(s["rewards"]["vowels"] for s in held_out) / len(held_out))
    assert row["eval/reward_mean"] == pytest.approx(0, abs=1e-9)  # z-scores of the held-out batch itself


def test_an_unknown_aggregation_is_a_config_error(tiny_model_dir, prompt_file, tmp_path):
    with pytest.raises(RaftError, match="ranker_aggregation"):
        raft.load_config("text", overrides=tiny_overrides(tiny_model_dir, prompt_file, tmp_path / "r") +
                         ["ranker_aggregation=mean"])
