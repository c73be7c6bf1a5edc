import pytest
import numpy as np
import torch

from raft.modalities.text.config import LoraConfig, TextGenerationConfig, TextModelConfig
from raft.modalities.text.model import load_policy
from raft.modalities.text.sampler import TextSampler

PROMPTS = ["the film", "a dull plot and bad acting all along", "i loved the music", "an excellent beautiful film"]


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    return load_policy(TextModelConfig(name_or_path=str(tiny_model_dir), device="cpu"), LoraConfig(), None)


def test_k_samples_per_prompt_grouped_with_provenance(policy):
    sampler = TextSampler(policy, TextGenerationConfig(max_new_tokens=5, batch_size=6), progress=False)
    samples = sampler.generate(PROMPTS, 3, seed=0)
    assert [s.prompt_index for s in samples] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert [s.prompt for s in samples[::3]] == PROMPTS
    assert all(s.meta["generator"] == "policy" and s.meta["settings"]["max_new_tokens"] == 5 for s in samples)
    assert all(s.meta["new_tokens"] <= 5 for s in samples)
    assert len({s.output for s in samples}) > 3  # sampled, not copied


def test_same_seed_same_samples_other_seed_other_samples(policy):
    sampler = TextSampler(policy, TextGenerationConfig(max_new_tokens=6), progress=False)
    first = [s.output for s in sampler.generate(PROMPTS, 2, seed=1)]
    assert first == [s.output for s in sampler.generate(PROMPTS, 2, seed=1)]
    assert first != [s.output for s in sampler.generate(PROMPTS, 2, seed=2)]


def test_shared_prefill_matches_plain_generation(policy):
    """Encoding each (left-padded) prompt once and copying its cache to K rows gives exactly what generate()
    gives on K copies of the prompt: checked with greedy decoding, where both must agree token for token."""
    shared = TextSampler(policy, TextGenerationConfig(temperature=0, max_new_tokens=8, share_prompt_prefill=True),
                         progress=False)
    plain = TextSampler(policy, TextGenerationConfig(temperature=0, max_new_tokens=8, share_prompt_prefill=False),
                        progress=False)
    encoded = [policy.encode_prompt(p) for p in PROMPTS]
    with torch.no_grad():
        (tokens, logprobs), (plain_tokens, plain_logprobs) = shared._sample_batch(policy.model, encoded, 2, 8), plain._sample_batch(policy.model, encoded, 2, 8)
    assert tokens == plain_tokens
    assert np.allclose(logprobs, plain_logprobs, atol=1e-4)  # the same log-probabilities, up to float rounding


def test_max_new_tokens_range_is_drawn_per_prompt(policy):
    sampler = TextSampler(policy, TextGenerationConfig(max_new_tokens_range=[2, 7]), progress=False)
    samples = sampler.generate(PROMPTS * 3, 2, seed=0)
    budgets = [s.meta["settings"]["max_new_tokens"] for s in samples]
    assert all(2 <= b < 7 for b in budgets) and len(set(budgets)) > 1
    assert all(s.meta["new_tokens"] <= s.meta["settings"]["max_new_tokens"] for s in samples)
    assert budgets[0] == budgets[1]  # the K samples of a prompt share its budget


def test_chat_template_is_used_when_present(policy):
    rendered = policy.render("hello")
    assert rendered.startswith("<|im_start|>user\nhello") and rendered.endswith("<|im_start|>assistant\n")
