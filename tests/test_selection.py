import math

from raft.config import SelectionConfig
from raft.interface import Sample
from raft.modalities.text.config import TextDiscardConfig
from raft.modalities.text.discard import build_discard_rules, repeated_ngram_fraction
from raft.selection import apply_discard_rules, select


def make(rewards_by_prompt):
    samples = []
    for p, rewards in enumerate(rewards_by_prompt):
        for r in rewards:
            samples.append(Sample(prompt_index=p, prompt=f"p{p}", output=f"out {p} {r}", reward=r))
    return samples


def test_local_keeps_best_m_of_each_prompt():
    samples = make([[0.1, 0.9, 0.5], [0.3, 0.2, 0.8]])
    kept = select(samples, SelectionConfig(strategy="local", keep_per_prompt=2))
    assert [(s.prompt_index, s.reward) for s in kept] == [(0, 0.9), (0, 0.5), (1, 0.3), (1, 0.8)]
    assert sum(s.selected for s in samples) == 4


def test_global_keeps_top_fraction_across_prompts():
    samples = make([[0.1, 0.2, 0.3, 0.4], [0.9, 0.8, 0.7, 0.6]])
    kept = select(samples, SelectionConfig(strategy="global", top_fraction=0.25))
    assert sorted(s.reward for s in kept) == [0.8, 0.9]  # both from prompt 1: no per-prompt quota


def test_global_cap_per_prompt_keeps_the_next_best_elsewhere():
    samples = make([[0.1, 0.2, 0.3, 0.4], [0.9, 0.8, 0.7, 0.6]])
    kept = select(samples, SelectionConfig(strategy="global", top_fraction=0.375, max_per_prompt=2))
    assert sorted(s.reward for s in kept) == [0.4, 0.8, 0.9]  # prompt 1's third best gives way to prompt 0's best


def test_threshold_and_min_reward_floor():
    samples = make([[0.1, 0.6], [0.7, 0.2]])
    kept = select(samples, SelectionConfig(strategy="threshold", min_reward=0.5))
    assert sorted(s.reward for s in kept) == [0.6, 0.7]
    samples = make([[0.1, 0.2], [0.7, 0.2]])
    kept = select(samples, SelectionConfig(strategy="local", min_reward=0.5))
    assert [s.reward for s in kept] == [0.7]  # prompt 0 has nothing above the floor


def test_ties_keep_the_earlier_sample():
    samples = make([[0.5, 0.5, 0.5]])
    kept = select(samples, SelectionConfig(strategy="local"))
    assert kept[0] is samples[0]


def test_discarded_samples_are_never_selected():
    samples = make([[0.9, 0.1]])
    samples[0].output = "# # # #"
    rules = build_discard_rules(TextDiscardConfig(min_words=0, patterns=["#"], max_repeated_ngram_fraction=None))
    assert apply_discard_rules(samples, rules) == 1
    assert samples[0].discard_reason == "matches /#/"
    kept = select(samples, SelectionConfig(strategy="local"))
    assert [s.reward for s in kept] == [0.1]


def test_length_and_repetition_rules():
    rules = build_discard_rules(TextDiscardConfig(min_words=3, max_words=6, max_repeated_ngram_fraction=0.3))
    texts = ["too short", "just the right length here", "one two three four five six seven",
             "the cat sat the cat sat the cat sat"]
    samples = [Sample(prompt_index=0, prompt="p", output=t) for t in texts]
    apply_discard_rules(samples, rules)
    assert [s.discard_reason for s in samples] == ["fewer than 3 words", None, "more than 6 words", "more than 6 words"]
    assert math.isclose(repeated_ngram_fraction("the cat sat the cat sat the cat sat"), 4 / 7)
    assert repeated_ngram_fraction("a b c d e") == 0.0


def test_all_keeps_every_sample_not_discarded():
    samples = make([[0.1, 0.9], [0.3, 0.2]])
    samples[1].discard_reason = "repetitive"
    kept = select(samples, SelectionConfig(strategy="all"))
    assert [s.reward for s in kept] == [0.1, 0.3, 0.2]  # in generation order, grouped by prompt
