"""PPO: the clipped losses, the KL penalty, GAE, the KL controller, learning on a small task, and a run in
raft's run directory."""

import json
import math

import pytest
import torch

from raft.baselines.ppo import PPOSettings, TextPPOConfig, run_ppo
from raft.config import load_config
from raft.finetune.losses import gae, policy_loss, token_rewards, value_loss
from raft.finetune.trainer import Trainer, TrainerSettings
from raft.modalities.text.ppo import PolicyWithValueHead, adapt_kl_coef, make_rollout, new_value_head, ppo_update
from raft.modalities.text.reference import TextReference
from raft.modalities.text.config import LoraConfig, TextGenerationConfig, TextModelConfig
from raft.modalities.text.model import load_policy
from raft.modalities.text.sampler import TextSampler
from raft.modalities.text.sft import build_example, collate, response_nll

from conftest import tiny_overrides
from rewards import vowel_share


pytestmark = pytest.mark.usefixtures("one_thread")


def test_clipped_policy_loss_has_zero_gradient_outside_the_clip_range():
    old = torch.zeros(1, 5)
    logprobs = torch.tensor([[0.5, -0.5, 0.1, -0.5, 0.5]], requires_grad=True)  # ratios 1.65, 0.61, 1.11, 0.61, 1.65
    advantages = torch.tensor([[1.0, -1.0, 1.0, 1.0, -1.0]])
    loss, clipfrac = policy_loss(logprobs, old, advantages, torch.ones(1, 5), cliprange=0.2)
    loss.backward()
    grad = logprobs.grad[0]
    assert grad[0] == 0  # advantage > 0, ratio above 1 + clip: no incentive to raise it further
    assert grad[1] == 0  # advantage < 0, ratio below 1 - clip: no incentive to lower it further
    assert grad[2].item() == pytest.approx(-math.exp(0.1) / 5)  # inside the range: -A * ratio / tokens
    assert grad[3].item() == pytest.approx(-math.exp(-0.5) / 5)  # the pessimistic side is never clipped
    assert grad[4].item() == pytest.approx(math.exp(0.5) / 5)
    assert clipfrac.item() == pytest.approx(2 / 5)
    assert loss.item() == pytest.approx((-1.2 + 0.8 - math.exp(0.1) - math.exp(-0.5) + math.exp(0.5)) / 5)


def test_clipped_value_loss_stops_at_the_clip_range():
    old, returns, mask = torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2)
    values = torch.tensor([[1.0, 0.1]], requires_grad=True)  # moved 1.0 (past the 0.2 clip) and 0.1 towards the return
    loss = value_loss(values, old, returns, mask, cliprange_value=0.2)
    loss.backward()
    assert values.grad[0, 0] == 0  # the clipped error (0.8^2) is the larger: no gradient through the new value
    assert values.grad[0, 1].item() == pytest.approx(0.5 * 2 * (0.1 - 1) / 2)
    assert loss.item() == pytest.approx(0.5 * (0.8**2 + 0.9**2) / 2)


def close(actual: torch.Tensor, expected: list) -> None:
    torch.testing.assert_close(actual.float(), torch.tensor(expected, dtype=torch.float32), atol=1e-6, rtol=1e-5)


def test_score_lands_on_the_last_response_token_and_gae_matches_hand_computation():
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 0, 0, 1]], dtype=torch.bool)  # prompt, response, padding
    logprobs = torch.tensor([[9.0, -1.0, -1.0, -1.0, 9.0], [9.0, 9.0, 9.0, 9.0, -2.0]])
    ref = torch.tensor([[0.0, -1.5, -1.0, -0.5, 0.0], [0.0, 0.0, 0.0, 0.0, -3.0]])
    rewards, kl = token_rewards(torch.tensor([2.0, -1.0]), logprobs, ref, mask, kl_coef=0.1)
    close(kl, [[0, 0.5, 0, -0.5, 0], [0, 0, 0, 0, 1.0]])
    close(rewards, [[0, -0.05, 0, 2.05, 0], [0, 0, 0, 0, -1.1]])

    rewards = torch.tensor([[0.0, 0.1, 0.2, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0, 3.0]])
    values = torch.tensor([[0.0, 0.5, 0.4, 0.3, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # delta_3 = 1 - 0.3 = 0.7; delta_2 = 0.2 + 0.3 - 0.4 = 0.1; delta_1 = 0.1 + 0.4 - 0.5 = 0
    # A_3 = 0.7, A_2 = 0.1 + 0.5 * 0.7 = 0.45, A_1 = 0 + 0.5 * 0.45 = 0.225; the second row ends at once: A = 3 - 1
    close(advantages, [[0, 0.225, 0.45, 0.7, 0], [0, 0, 0, 0, 2.0]])
    close(returns, [[0, 0.725, 0.85, 1.0, 0], [0, 0, 0, 0, 3.0]])
    advantages, _ = gae(rewards, values, mask, gamma=0.5, lam=1.0)
    assert advantages[0, 1].item() == pytest.approx(0.1 + 0.5 * 0.2 + 0.25 * 1.0 - 0.5)  # discounted return - V


def test_kl_coefficient_adapts_towards_the_target():
    settings = PPOSettings(target_kl=6.0, kl_horizon=100)
    assert adapt_kl_coef(0.1, 12.0, 50, settings) == pytest.approx(0.1 * (1 + 0.2 * 0.5))  # error clipped at 0.2
    assert adapt_kl_coef(0.1, 4.5, 50, settings) == pytest.approx(0.1 * (1 - 0.25 * 0.5 * 0.8))
    assert adapt_kl_coef(0.1, 6.0, 50, settings) == pytest.approx(0.1)


def tiny_policy(model_dir, lora=False):
    lora_config = LoraConfig(enabled=True, r=4) if lora else LoraConfig()
    return load_policy(TextModelConfig(name_or_path=str(model_dir), device="cpu"), lora_config, None)


def responses_batch(policy, count=6, seed=0):
    sampler = TextSampler(policy, TextGenerationConfig(max_new_tokens=6, temperature=1.0), progress=False)
    samples = sampler.generate([f"review {i}" for i in range(count // 2)], 2, seed=seed)
    examples = [build_example(policy.encode_prompt(s.prompt), s.meta["token_ids"], 512) for s in samples]
    return collate(examples, policy.tokenizer.pad_token_id, "cpu")


def reference_of(policy, model_dir):
    """The loop's reference: under LoRA the adapter-disabled policy, else the starting model loaded again."""
    return TextReference(policy, lambda: tiny_policy(model_dir).model, 1.0, 512)


@pytest.mark.parametrize("lora", [False, True])
def test_kl_penalty_grows_as_the_policy_moves(tiny_model_dir, lora):
    policy = tiny_policy(tiny_model_dir, lora)
    reference = reference_of(policy, tiny_model_dir)  # LoRA: the adapter-disabled base, no second copy
    batch = responses_batch(policy)
    module = PolicyWithValueHead(policy.model, torch.nn.Linear(policy.model.config.hidden_size, 1))
    settings = PPOSettings(mini_batch_size=4)
    # Adam on the mean NLL: SGD on the summed NLL oscillated under LoRA for some samples (the penalty fell, then rose)
    optimizer = torch.optim.Adam([p for p in policy.model.parameters() if p.requires_grad], lr=3e-3 if lora else 1e-3)
    penalties = []
    for _ in range(3):
        rollout = make_rollout(module, reference, batch, torch.zeros(6), 0.1, 1.0, settings)
        penalties.append(-rollout["rewards"].sum().item())  # the score is 0: what is left is the KL penalty
        for _ in range(3):  # move the policy: raise the likelihood of these responses
            nll, tokens = response_nll(policy.model, batch)
            (nll / tokens).backward()
            optimizer.step()
            optimizer.zero_grad()
    assert penalties[0] == pytest.approx(0.0, abs=1e-5)  # the untouched policy is its own reference
    assert 0 < penalties[1] < penalties[2]
    assert (not reference.frozen) == lora  # under LoRA no copy of the model was loaded


def test_ppo_raises_the_reward_on_a_small_task(tiny_model_dir):
    """Reward: the share of vowels in the response; 8 prompts x 4 samples x 4 tokens per batch, 20 batches."""
    policy = tiny_policy(tiny_model_dir)
    reference = reference_of(policy, tiny_model_dir)
    sampler = TextSampler(policy, TextGenerationConfig(max_new_tokens=4, temperature=1.0), progress=False)
    module = PolicyWithValueHead(policy.model, new_value_head(policy.model.config.hidden_size, "cpu"))
    settings = PPOSettings(learning_rate=3e-3, mini_batch_size=16, kl_coef=0.01)
    trainer = Trainer(module, TrainerSettings(settings.learning_rate, 0.01, settings.max_grad_norm, True))
    rewards, kls = [], []
    for iteration in range(20):
        samples = sampler.generate([f"review {i}" for i in range(8)], 4, seed=iteration)
        scores = torch.tensor(vowel_share(None, [s.output for s in samples]))
        examples = [build_example(policy.encode_prompt(s.prompt), s.meta["token_ids"], 512) for s in samples]
        batch = collate(examples, policy.tokenizer.pad_token_id, "cpu")
        rollout = make_rollout(module, reference, batch, scores, settings.kl_coef, 1.0, settings)
        stats = ppo_update(trainer, batch, rollout, 1.0, settings, iteration)
        rewards.append(scores.mean().item())
        kls.append(stats["ppo/kl"])
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert last > first + 0.1, rewards
    assert sum(kls[-4:]) / 4 > 0.1 > abs(kls[0])  # it got there by moving away from the reference


def test_ppo_writes_raft_run_directory_and_resumes(tiny_model_dir, prompt_file, reference_file, tmp_path):
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(tiny_model_dir, prompt_file, run_dir, reference_file) + [
        "iterations=1", "finetune.lora.enabled=true", "finetune.lora.r=4", "ppo.adaptive_kl=true",
        "ppo.missing_eos_penalty=1.0", "ppo.whiten_rewards=true"]
    run_ppo(load_config(TextPPOConfig, None, overrides))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1]
    for key in ["reward/policy_mean", "eval/reward_mean", "eval/reward_sem", "eval/perplexity", "eval/distinct_1",
                "eval/distinct_2", "train/loss", "ppo/kl", "ppo/kl_coef", "ppo/clipfrac", "ppo/value_loss",
                "time/generate", "time/rank", "time/finetune", "time/evaluate"]:
        assert isinstance(rows[1][key], float), key
    assert rows[1]["ppo/kl"] == pytest.approx(0.0, abs=1e-4)  # LoRA starts as its reference
    assert rows[1]["samples"] == 9
    checkpoint = run_dir / "checkpoints/iter-0001"
    assert {"adapter_model.safetensors", "value_head.pt", "optimizer.pt", "ppo_state.json"} <= {
        p.name for p in checkpoint.iterdir()}
    assert json.loads((checkpoint / "ppo_state.json").read_text())["kl_coef"] != 0.05  # adapted once
    samples = [json.loads(line) for line in (run_dir / "iterations/iter-0001/samples.jsonl").read_text().splitlines()]
    assert len(samples) == 9 and all(isinstance(s["token_ids"], list) for s in samples)

    config = load_config(TextPPOConfig, run_dir / "config.yaml", ["iterations=2"])
    run_ppo(config, resume=True)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    # the coefficient carried over: KL far below target_kl lowers it by 20% x 9 rollouts / 10000 per iteration
    assert rows[2]["ppo/kl_coef"] == pytest.approx(0.05 * (1 - 0.2 * 9 / 10000), rel=1e-9)


@pytest.mark.parametrize("overrides, expected", [
    (["generators.0.kind=file", "generators.0.path=samples.jsonl"],
     "config: generators.0.kind must be policy with PPO: it learns from the policy's own samples only, got file"),
    (["generators.0.sampling_template={prompt} Be upbeat."],
     "config: generators.0.sampling_template and sampling_system_prompt must be unset with PPO"),
    (["generators.0.sampling_system_prompt=Be upbeat."],
     "config: generators.0.sampling_template and sampling_system_prompt must be unset with PPO"),
])
def test_ppo_refuses_generators_it_cannot_learn_from_in_one_line(overrides, expected, capsys):
    from raft.cli import main

    assert main(["ppo", *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"raft: error: {expected}") and err.count("\n") == 1


def test_ppo_is_an_objective_of_the_loop(tiny_model_dir, prompt_file, tmp_path, capsys):
    """`raft run finetune.objective=ppo` is `raft ppo`: PPO's settings are fixed for it, and its run resumes as any."""
    from raft.cli import main

    run_dir = tmp_path / "run"
    assert main(["run", *tiny_overrides(tiny_model_dir, prompt_file, run_dir), "iterations=1",
                 "finetune.objective=ppo"]) == 0
    saved = load_config(TextPPOConfig, run_dir / "config.yaml")
    assert (saved.finetune.objective, saved.selection.strategy, saved.kl.beta) == ("ppo", "all", 0.0)
    assert main(["run", "--resume", str(run_dir), "--trust-run-code", "iterations=2"]) == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2] and all(r["selected"] == 9 for r in rows[1:])
    with pytest.raises(Exception, match="finetune.objective ppo takes its settings from the ppo section"):
        load_config(type(saved).__mro__[1], None, ["finetune.objective=ppo"])  # the text config has no ppo section
