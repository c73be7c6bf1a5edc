"""RRHF: the loss against hand-computed values, its wiring through the model, and a run in the RAFT loop."""

import json

import pytest
import torch

import raft
from raft.errors import ConfigError
from raft.interface import Sample
from raft.modalities.text.config import LoraConfig, TextFinetuneConfig, TextModelConfig
from raft.modalities.text.model import load_policy
from raft.modalities.text.rrhf import RrhfFineTuner, rrhf_loss
from raft.modalities.text.sft import collate, response_nll

from conftest import tiny_overrides


def test_rrhf_loss_matches_hand_computed_values():
    sums = torch.tensor([-4.0, -3.0, -6.0])
    lengths = torch.tensor([2, 3, 2])
    rewards = torch.tensor([0.5, 0.1, 0.9])
    # length_penalty 1: scores -2, -1, -3. Pairs (worse, better): (1, 0): -1 - -2 = 1; (1, 2): -1 - -3 = 2;
    # (0, 2): -2 - -3 = 1. Ranking loss 4. Best is candidate 2: NLL 6 / 2 = 3.
    loss, rank, nll = rrhf_loss(sums, lengths, rewards, rrhf_weight=0.5, length_penalty=1.0)
    assert (rank.item(), nll.item(), loss.item()) == pytest.approx((4.0, 3.0, 0.5 * 4 + 3))
    # length_penalty 0: scores are the sums -4, -3, -6: (1, 0): 1; (1, 2): 3; (0, 2): 2
    loss, rank, nll = rrhf_loss(sums, lengths, rewards, rrhf_weight=1.0, length_penalty=0.0)
    assert (rank.item(), loss.item()) == pytest.approx((6.0, 9.0))
    # length_penalty 2: scores -1, -1/3, -1.5: (1, 0): 2/3; (1, 2): 7/6; (0, 2): 1/2
    _, rank, _ = rrhf_loss(sums, lengths, rewards, rrhf_weight=1.0, length_penalty=2.0)
    assert rank.item() == pytest.approx(2 / 3 + 7 / 6 + 1 / 2)


def test_rrhf_loss_ignores_ties_and_correctly_ordered_pairs():
    sums, lengths = torch.tensor([-1.0, -5.0, -2.0]), torch.tensor([1, 1, 1])
    _, rank, nll = rrhf_loss(sums, lengths, torch.tensor([0.9, 0.1, 0.5]), 1.0, 1.0)
    assert rank.item() == 0.0 and nll.item() == pytest.approx(1.0)  # policy already orders them as the reward
    _, rank, nll = rrhf_loss(sums, lengths, torch.tensor([0.3, 0.3, 0.3]), 1.0, 1.0)
    assert rank.item() == 0.0 and nll.item() == pytest.approx(1.0)  # all tied: no pair; best = first
    # the gradient pushes the worse candidate's score down and the better one's up
    sums = torch.tensor([-1.0, -2.0], requires_grad=True)
    rrhf_loss(sums, torch.tensor([1, 1]), torch.tensor([0.0, 1.0]), 1.0, 1.0)[1].backward()
    assert sums.grad.tolist() == [1.0, -1.0]


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    return load_policy(TextModelConfig(name_or_path=str(tiny_model_dir), device="cpu"), LoraConfig(), None)


def candidates():
    outputs = [("great film", 0.9), ("boring and bad", -0.5), ("a film", 0.1)]
    group = [Sample(prompt_index=0, prompt="a review", output=o, reward=r, meta={"finished": True})
             for o, r in outputs]
    other = [Sample(prompt_index=1, prompt="another review", output=o, reward=r, meta={"finished": False})
             for o, r in [("awful", -0.9), ("wonderful music", 0.8)]]
    return group + other


def test_rrhf_step_is_the_mean_of_each_prompts_loss_computed_one_candidate_at_a_time(policy):
    tuner = RrhfFineTuner(policy, TextFinetuneConfig(objective="rrhf", rrhf_weight=0.7, length_penalty=1.0, mixed_precision="no"), None,
                          progress=False)
    samples = candidates()
    units = tuner.units(samples)
    assert [len(group) for group, _ in units] == [3, 2]

    expected = []
    for group, rewards in units:  # each candidate alone, through the supervised loss's own code
        sums, lengths = [], []
        for example in group:
            nll, count = response_nll(policy.model, collate([example], policy.tokenizer.pad_token_id, "cpu"))
            sums.append(-nll.item())
            lengths.append(count)
        expected.append(rrhf_loss(torch.tensor(sums), torch.tensor(lengths), torch.tensor(rewards), 0.7, 1.0)[0].item())

    policy.model.zero_grad()
    metrics = tuner.step_loss([units])  # both prompts in one padded micro-batch
    assert metrics["train/loss"] == pytest.approx(sum(expected) / 2, rel=1e-4)
    grad_one = [p.grad.clone() for p in policy.model.parameters()]
    policy.model.zero_grad()
    tuner.step_loss([[units[0]], [units[1]]])  # one prompt per micro-batch: same gradient
    for g, p in zip(grad_one, policy.model.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-6)
    policy.model.zero_grad()


def test_rrhf_training_orders_the_candidates_as_the_reward(tiny_model_dir, one_thread):
    policy = load_policy(TextModelConfig(name_or_path=str(tiny_model_dir), device="cpu"), LoraConfig(), None)
    tuner = RrhfFineTuner(policy, TextFinetuneConfig(objective="rrhf", learning_rate=1e-2, epochs=15, batch_size=2),
                          None, progress=False)
    samples = candidates()
    before = tuner.finetune(samples, seed=0)
    after = tuner.finetune(samples, seed=1)
    assert before["train/rank_loss"] > 0
    assert after["train/rank_loss"] < 0.1 * before["train/rank_loss"]
    assert after["train/sft_loss"] < before["train/sft_loss"]


def test_rrhf_runs_in_the_raft_loop(tiny_model_dir, prompt_file, tmp_path):
    overrides = tiny_overrides(tiny_model_dir, prompt_file, tmp_path / "run") + [
        "iterations=1", "finetune.objective=rrhf", "selection.strategy=all"]
    run_dir = raft.run(raft.load_config("text", overrides=overrides))
    row = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    assert row["selected"] == row["samples"] == 9  # every candidate is kept for ranking
    assert row["train/rank_loss"] >= 0 and row["train/loss"] >= row["train/sft_loss"]


def test_rrhf_with_one_candidate_per_prompt_is_refused():
    with pytest.raises(ConfigError, match="finetune.objective rrhf ranks several candidates per prompt"):
        raft.load_config("text", overrides=["finetune.objective=rrhf"])
