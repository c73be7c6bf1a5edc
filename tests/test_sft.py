import pytest
import torch

from raft.interface import Sample
from raft.modalities.text.config import LoraConfig, TextFinetuneConfig, TextModelConfig
from raft.modalities.text.model import load_policy
from raft.modalities.text.sft import IGNORE, TextFineTuner, build_example, collate, response_nll


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    return load_policy(TextModelConfig(name_or_path=str(tiny_model_dir), device="cpu"), LoraConfig(), None)


def test_build_example_masks_prompt_and_cuts_prompt_from_the_left():
    ids, labels = build_example([1, 2, 3, 4], [7, 8], max_length=10)
    assert ids == [1, 2, 3, 4, 7, 8] and labels == [IGNORE] * 4 + [7, 8]
    ids, labels = build_example([1, 2, 3, 4], [7, 8], max_length=4)
    assert ids == [3, 4, 7, 8] and labels == [IGNORE, IGNORE, 7, 8]


def test_prompt_tokens_contribute_nothing(policy):
    """The loss equals cross-entropy over response tokens alone, and its gradient reaches no prompt position."""
    model = policy.model
    prompt, response = [5, 9, 11, 13, 17], [21, 22, 23]
    batch = collate([build_example(prompt, response, 64)], policy.tokenizer.pad_token_id, "cpu")
    logits = model(input_ids=batch["input_ids"]).logits[0]
    expected = sum(torch.nn.functional.cross_entropy(logits[len(prompt) - 1 + i][None], torch.tensor([t]),
                                                     reduction="sum") for i, t in enumerate(response))
    nll, count = response_nll(model, batch)
    assert count == len(response)
    assert nll.item() == pytest.approx(expected.item(), rel=1e-5)

    # changing every prompt token's target changes nothing: only positions that predict response tokens count
    embeddings = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
    out = model(inputs_embeds=embeddings).logits
    out.retain_grad()
    targets = batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(out[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=IGNORE,
                                             reduction="sum")
    loss.backward()
    grad_per_position = out.grad[0].abs().sum(-1)
    assert torch.all(grad_per_position[: len(prompt) - 1] == 0)  # positions predicting prompt tokens
    assert torch.all(grad_per_position[len(prompt) - 1 : -1] > 0)  # positions predicting response tokens


def test_padding_adds_nothing_and_examples_are_not_packed(policy):
    pad = policy.tokenizer.pad_token_id
    short, long = build_example([5, 6], [7, 8], 64), build_example([5, 6, 9, 10, 11], [12, 13, 14], 64)
    batch = collate([short, long], pad, "cpu")
    assert batch["input_ids"].shape == (2, 8)  # one row per example
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    together, count = response_nll(policy.model, batch)
    alone = sum(response_nll(policy.model, collate([e], pad, "cpu"))[0] for e in (short, long))
    assert count == 5
    assert together.item() == pytest.approx(alone.item(), rel=1e-4)


def test_finetuning_raises_the_likelihood_of_kept_responses(tiny_model_dir):
    policy = load_policy(TextModelConfig(name_or_path=str(tiny_model_dir), device="cpu"), LoraConfig(), None)
    tuner = TextFineTuner(policy, TextFinetuneConfig(learning_rate=1e-2, epochs=10, batch_size=2), None, progress=False)
    kept = [Sample(prompt_index=0, prompt="a review", output="great film", meta={"finished": True})]
    batch = collate([tuner.example(kept[0])], policy.tokenizer.pad_token_id, "cpu")
    before = response_nll(policy.model, batch)[0].item()
    metrics = tuner.finetune(kept, seed=0)
    after = response_nll(policy.model, batch)[0].item()
    assert after < 0.6 * before
    assert metrics["train/steps"] == 10


def test_optimizer_state_carries_only_when_asked(tiny_model_dir, tmp_path):
    kept = [Sample(prompt_index=0, prompt="a review", output="great film", meta={"finished": False})]
    for carry in (False, True):
        policy = load_policy(TextModelConfig(name_or_path=str(tiny_model_dir), device="cpu"), LoraConfig(), None)
        tuner = TextFineTuner(policy, TextFinetuneConfig(carry_optimizer_state=carry), None, progress=False)
        tuner.finetune(kept, seed=0)
        tuner.save_checkpoint(tmp_path / str(carry))
        assert (tmp_path / str(carry) / "optimizer.pt").is_file() == carry
        assert (tuner.optimizer is not None) == carry
    state = torch.load(tmp_path / "True" / "optimizer.pt", weights_only=True)
    assert state["state"]  # AdamW moments were saved
    resumed = TextFineTuner(policy, TextFinetuneConfig(carry_optimizer_state=True), tmp_path / "True", progress=False)
    assert resumed.optimizer.state_dict()["state"][0]["step"] == state["state"][0]["step"]


def test_unfinished_samples_get_no_eos(policy):
    tuner = TextFineTuner(policy, TextFinetuneConfig(), None, progress=False)
    eos = policy.tokenizer.eos_token_id
    finished = tuner.example(Sample(prompt_index=0, prompt="p", output="great film", meta={"finished": True}))
    cut = tuner.example(Sample(prompt_index=0, prompt="p", output="great film", meta={"finished": False}))
    assert finished[0][-1] == eos and cut[0][-1] != eos


def test_bf16_mixed_precision_trains_through_accelerate_on_cpu(tiny_model_dir):
    """finetune.mixed_precision=bf16: the forward runs under accelerate's autocast (the loss differs a little from
    float32's), the weights stay float32, and a later trainer in the same process can go back to float32."""
    kept = [Sample(prompt_index=0, prompt="a review", output="great film", meta={"finished": True}),
            Sample(prompt_index=1, prompt="another", output="dull plot", meta={"finished": True})]
    results = {}
    for precision in ("bf16", "no"):
        policy = load_policy(TextModelConfig(name_or_path=str(tiny_model_dir), device="cpu"), LoraConfig(), None)
        tuner = TextFineTuner(policy, TextFinetuneConfig(learning_rate=1e-2, epochs=3, batch_size=2,
                                                         mixed_precision=precision), None, progress=False)
        assert tuner.trainer.accelerator.mixed_precision == precision
        results[precision] = tuner.finetune(kept, seed=0)["train/loss"]
        assert all(p.dtype == torch.float32 for p in policy.model.parameters())
    assert results["bf16"] != results["no"]
    assert results["bf16"] == pytest.approx(results["no"], rel=0.05)


def test_policy_samples_are_trained_on_their_sampled_token_ids(policy):
    """A policy sample's response is trained on the ids it was drawn as, not its decoded text re-encoded (which
    loses, e.g., the leading space of the first token); text from elsewhere is tokenized."""
    from raft.modalities.text.config import TextGenerationConfig
    from raft.modalities.text.sampler import TextSampler

    tuner = TextFineTuner(policy, TextFinetuneConfig(), None, progress=False)
    drawn = TextSampler(policy, TextGenerationConfig(max_new_tokens=6), progress=False).generate(["the film"], 4, seed=0)
    for sample in drawn:
        ids, labels = tuner.example(sample)
        response = sample.meta["token_ids"]
        assert ids[-len(response):] == response and labels[-len(response):] == response
        assert labels[: len(ids) - len(response)] == [IGNORE] * (len(ids) - len(response))
    retokenized = [policy.tokenizer(s.output, add_special_tokens=False)["input_ids"] for s in drawn]
    assert any(r != s.meta["token_ids"][: len(r)] for r, s in zip(retokenized, drawn))  # the round trip differs

    elsewhere = Sample(0, "the film", "was good", meta={"finished": False})
    ids, labels = tuner.example(elsewhere)
    assert labels[-2:] == policy.tokenizer("was good", add_special_tokens=False)["input_ids"][-2:]
