"""model.inference_dtype: a reduced-precision copy of the policy samples, scores and evaluates; training keeps the
full-precision weights, and the copy follows them."""

from __future__ import annotations

import copy

import pytest
import torch

from test_defences import perturbed


def hand_logprob(model, prompt_ids, response_ids, temperature):
    """sum_t log pi(y_t | x, y_<t), one unpadded forward per token; the logits in float32, as the sampler takes them."""
    total = 0.0
    for t, token in enumerate(response_ids):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt_ids + response_ids[:t]])).logits[0, -1].float()
        total += float(torch.log_softmax(logits / temperature, -1)[token])
    return total


def hand_log_ratio(policy_model, reference_model, prompt_ids, response_ids, temperature):
    return (hand_logprob(policy_model, prompt_ids, response_ids, temperature)
            - hand_logprob(reference_model, prompt_ids, response_ids, temperature))


def load(tiny_model_dir, inference_dtype="bfloat16", lora=False):
    from raft.modalities.text.config import LoraConfig, TextModelConfig
    from raft.modalities.text.model import load_policy

    model_config = TextModelConfig(name_or_path=str(tiny_model_dir), inference_dtype=inference_dtype)
    return model_config, load_policy(model_config, LoraConfig(enabled=lora), None)


@pytest.mark.parametrize("lora", [False, True])
def test_the_copy_samples_and_follows_the_trained_weights(tiny_model_dir, lora, one_thread):
    from raft.modalities.text.config import TextGenerationConfig
    from raft.modalities.text.sampler import TextSampler

    _, policy = load(tiny_model_dir, lora=lora)
    assert next(policy.model.parameters()).dtype == torch.float32  # training keeps full precision
    first = policy.inference_model()
    assert first is not policy.model and next(first.parameters()).dtype == torch.bfloat16
    assert policy.inference_model() is first  # unchanged weights: no new copy
    # made parameter by parameter (no float32 duplicate on the way): its own storage, tied weights still one tensor
    trained = {p.data_ptr() for p in policy.model.parameters()}
    assert not any(p.data_ptr() in trained for p in first.parameters())
    embeddings, head = first.get_input_embeddings(), first.get_output_embeddings()
    if policy.model.config.tie_word_embeddings:
        assert embeddings.weight is head.weight

    greedy = TextSampler(policy, TextGenerationConfig(max_new_tokens=8, temperature=0, share_prompt_prefill=False),
                         progress=False)
    prompt = "the film was"
    ids = torch.tensor([policy.encode_prompt(prompt)])
    for step in range(2):
        by_hand = copy.deepcopy(policy.model).to(torch.bfloat16).eval()  # what the copy must be, made here
        with torch.no_grad():
            expected = by_hand.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                        max_new_tokens=8, pad_token_id=policy.tokenizer.pad_token_id,
                                        eos_token_id=sorted(policy.eos_ids))[0, ids.shape[1]:].tolist()
        sample = greedy.generate([prompt], 1, seed=0)[0]
        end = next((j for j, t in enumerate(expected) if t in policy.eos_ids), len(expected) - 1)
        assert sample.meta["token_ids"] == expected[: end + 1]
        for mine, theirs in zip(policy.inference_model().parameters(), by_hand.parameters()):
            assert torch.equal(mine, theirs)
        perturbed(policy.model, seed=step, scale=0.2)  # a training step: the next call must see it
        assert policy.inference_model() is not first
        first = policy.inference_model()


@pytest.mark.parametrize("lora", [False, True])
def test_ranking_log_ratios_are_the_copies(tiny_model_dir, lora, one_thread):
    """Sampler and reference both work in the inference dtype: the recorded log-probabilities and the log-ratios are
    those of bf16 copies of the policy and of the start, and ranking runs no forward pass of the policy."""
    from raft.modalities.text.config import TextGenerationConfig
    from raft.modalities.text.reference import TextReference, starting_model_loader
    from raft.modalities.text.sampler import TextSampler

    model_config, policy = load(tiny_model_dir, lora=lora)
    start = starting_model_loader(model_config)().eval().to(torch.bfloat16)
    reference = TextReference(policy, starting_model_loader(model_config), temperature=0.7, max_length=512)
    reference._unchanged()  # fingerprints the start
    perturbed(policy.model, scale=0.1)
    samples = TextSampler(policy, TextGenerationConfig(max_new_tokens=8, temperature=0.7), progress=False).generate(
        ["the film was", "a dull plot"], 2, seed=1)
    copy_of_policy = policy.inference_model()
    calls = []
    for model in (policy.model, copy_of_policy):
        model.register_forward_hook(lambda *args: calls.append(1))
    ratios = reference.log_ratios(samples)
    if not lora:  # (under LoRA the reference is the copy with its adapter disabled: it runs)
        assert not calls  # the policy's side came from the sampler
    for sample, ratio in zip(samples, ratios):
        prompt_ids = policy.encode_prompt(sample.prompt)
        tokens = sample.meta["token_ids"]
        # bf16 kernels differ a little between a batch and one row: tolerances of a few hundredths of a nat
        assert sample.meta["logprob"] == pytest.approx(hand_logprob(copy_of_policy, prompt_ids, tokens, 0.7), abs=0.05)
        if lora:
            with copy_of_policy.disable_adapter():
                expected = -hand_logprob(copy_of_policy, prompt_ids, tokens, 0.7)
            expected += hand_logprob(copy_of_policy, prompt_ids, tokens, 0.7)
        else:
            expected = hand_log_ratio(copy_of_policy, start, prompt_ids, tokens, 0.7)
        assert ratio == pytest.approx(expected, abs=0.05)
        assert abs(expected) > 0.1  # the policy moved: a real ratio, so the test can fail
    if not lora:
        assert next(reference.frozen[torch.bfloat16].parameters()).dtype == torch.bfloat16


def test_resolving_the_setting(monkeypatch):
    from raft.modalities.text import model

    cpu = torch.device("cpu")
    assert model.resolve_inference_dtype("model", "float32", cpu) is None
    assert model.resolve_inference_dtype("float32", "float32", cpu) is None  # the weights' own: no copy
    assert model.resolve_inference_dtype("bfloat16", "float32", cpu) == torch.bfloat16
    for fast, expected in ((True, torch.bfloat16), (False, None)):
        monkeypatch.setattr(model, "has_fast_bf16", lambda device, fast=fast: fast)
        assert model.resolve_inference_dtype("auto", "float32", cpu) == expected


def test_an_unknown_dtype_is_refused_before_loading():
    import raft
    from raft.errors import RaftError

    with pytest.raises(RaftError, match="model.inference_dtype"):
        raft.load_config("text", overrides=["model.inference_dtype=int8"])


def test_perplexity_is_the_hand_computed_one(tiny_model_dir, one_thread):
    """The evaluator's perplexity (picked logit minus logsumexp, batched and padded) equals exp of the mean negative
    log-likelihood computed text by text with a full log_softmax, in float32 and in the bf16 copy alike."""
    import math

    from raft.modalities.text.evaluate import TextEvaluator

    texts = ["the film was a quiet delight", "I did not like it at all, not one bit", "fine"]
    for dtype in ("model", "bfloat16"):
        _, policy = load(tiny_model_dir, inference_dtype=dtype)
        perturbed(policy.model, seed=3, scale=0.2)
        model = policy.inference_model()
        total, count = 0.0, 0
        for text in texts:
            ids = policy.tokenizer(text, add_special_tokens=True)["input_ids"][:16]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
            total -= float(torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None]).sum())
            count += len(ids) - 1
        measured = TextEvaluator(policy, texts, batch_size=2, max_tokens=16).perplexity()
        assert measured == pytest.approx(math.exp(total / count), rel=1e-3 if dtype == "bfloat16" else 1e-5)


def test_loading_with_lora_and_checkpointing_prints_no_deprecation_warning(tiny_model_dir):
    """The console stays clean: peft's read of transformers' deprecated `is_gradient_checkpointing` is silenced at
    raft's call, and raft enables activation checkpointing under its current name."""
    import warnings

    from raft.modalities.text.model import enable_activation_checkpointing

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, policy = load(tiny_model_dir, lora=True)
        enable_activation_checkpointing(policy.model)
    assert any(getattr(module, "gradient_checkpointing", False) for module in policy.model.modules())  # enabled
    deprecations = [str(w.message) for w in caught if "deprecat" in str(w.message).lower()]
    assert deprecations == []
