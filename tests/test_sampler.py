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


@pytest.mark.parametrize("k", [1, 2])
def test_shared_prefill_matches_plain_generation(policy, k):
    """Encoding each (left-padded) prompt once and copying its cache to K rows gives exactly what generate()
    gives on K copies of the prompt: checked with greedy decoding, where both must agree token for token. At K = 1
    the prefill is raft's too (generate()'s own is slow on frozen weights)."""
    shared = TextSampler(policy, TextGenerationConfig(temperature=0, max_new_tokens=8, share_prompt_prefill=True),
                         progress=False)
    plain = TextSampler(policy, TextGenerationConfig(temperature=0, max_new_tokens=8, share_prompt_prefill=False),
                        progress=False)
    encoded = [policy.encode_prompt(p) for p in PROMPTS]
    prefills = []
    prefill = shared._prefill
    shared._prefill = lambda *args: prefills.append(1) or prefill(*args)
    with torch.no_grad():
        (tokens, logprobs), (plain_tokens, plain_logprobs) = shared._sample_batch(policy.model, encoded, k, 8), plain._sample_batch(policy.model, encoded, k, 8)
    assert prefills == [1]  # raft's prefill ran, at K = 1 as well
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


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (2, 1.0), (0, 0.6)])
def test_inverse_cdf_sampling_draws_from_the_warped_distribution(top_k, top_p):
    """raft's own draw (generate then takes it greedily) follows temperature, top-k and top-p as transformers applies
    them, and records the drawn token's log-probability under the untruncated distribution."""
    from transformers import TopKLogitsWarper, TopPLogitsWarper

    from raft.modalities.text.sampler import InverseCdfSampling

    torch.manual_seed(0)
    rows, temperature = 40000, 0.7
    logits = torch.tensor([2.0, 1.5, 0.3, -1.0, 0.9])
    scores = logits.repeat(rows, 1)
    sampler = InverseCdfSampling(temperature, top_k, top_p)
    out = sampler(torch.zeros(rows, 1, dtype=torch.long), scores)
    assert torch.isfinite(out).sum(-1).eq(1).all()  # one token per row, for generate's argmax
    drawn = out.argmax(-1)
    expected = logits / temperature
    if top_k:
        expected = TopKLogitsWarper(top_k)(None, expected[None])[0]
    if top_p < 1:
        expected = TopPLogitsWarper(top_p)(None, expected[None])[0]
    expected = expected.softmax(-1)
    frequencies = torch.bincount(drawn, minlength=5).float() / rows
    assert frequencies == pytest.approx(expected.tolist(), abs=0.01)
    assert (frequencies[expected == 0] == 0).all()  # truncated tokens are never drawn
    recorded = sampler.finish(drawn[:, None])[:, 0]
    assert recorded == pytest.approx(torch.log_softmax(logits / temperature, -1)[drawn].tolist(), abs=1e-6)


def test_inverse_cdf_sampling_over_blocks_of_a_large_vocabulary():
    """Without top-k/top-p the draw locates its block of the vocabulary, then its token: the same token as an exact
    (float64) inverse CDF with the same uniform, never a banned (-inf) token or one past the vocabulary's end (the
    last block is padded), and the recorded log-probability is the model's."""
    from raft.modalities.text.sampler import InverseCdfSampling

    torch.manual_seed(0)
    rows, vocab, temperature = 2000, 2500, 0.8  # three blocks of 1024, the last one padded
    logits = torch.randn(rows, vocab) * 2
    logits[:, 2000] = float("-inf")
    logits[:, vocab - 1] += 6  # much of the mass on the very last token
    sampler = InverseCdfSampling(temperature)
    state = torch.get_rng_state()
    drawn = sampler(torch.zeros(rows, 1, dtype=torch.long), logits.clone()).argmax(-1)
    torch.set_rng_state(state)
    uniforms = torch.rand(rows, 1).double()
    cdf = torch.softmax(logits.double() / temperature, -1).cumsum(-1)
    exact = torch.searchsorted(cdf, uniforms * cdf[:, -1:], right=True)[:, 0]
    assert (drawn == exact).float().mean() >= 0.999
    assert drawn.max() < vocab and not (drawn == 2000).any() and (drawn == vocab - 1).any()
    recorded = sampler.finish(drawn[:, None])[:, 0]
    expected = torch.log_softmax(logits / temperature, -1).gather(-1, drawn[:, None])[:, 0]
    assert torch.allclose(recorded, expected, atol=1e-5)
    again = sampler(torch.zeros(rows, 1, dtype=torch.long), logits.clone())  # the reused buffer: one token per row
    assert torch.isfinite(again).sum(-1).eq(1).all()
