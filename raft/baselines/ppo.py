"""PPO for causal LMs (RLHF as in Ziegler et al. 2019 / Ouyang et al. 2022): the baseline RAFT is measured against.

It runs in raft's harness: rollouts come from raft's sampler, rewards from any raft ranker (a lexicon, a
classifier, a Python callable), held-out evaluation and the run directory are the RAFT loop's, so
metrics.jsonl rows carry the same names (plus ppo/*). The details follow "The N+ implementation details of
RLHF with PPO" (Huang et al. 2024) and TRL's last PPO defaults:

- a value head on the policy's last hidden state (zero-initialised: no reward model to start it from);
- a frozen reference: the starting model, or with LoRA the same model with its adapter disabled;
- per-token reward: -kl_coef * (log pi - log pi_ref) on every response token, plus the ranker's score on
  the last one (EOS when the response ended; missing_eos_penalty otherwise); optional reward whitening;
- GAE over response tokens, advantages whitened per batch;
- clipped surrogate policy loss, clipped value loss; kl_coef fixed or adapted towards target_kl.

    raft ppo --config configs/text-imdb-lora.yaml ppo.learning_rate=1e-5
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from raft.config import _check, option
from raft.loop import (Stages, budget_spent, draw_prompts, evaluate, evaluate_starting_policy, open_run_directory,
                       report, summarize, write_samples)
from raft.metrics import mean, plot_metrics
from raft.modalities.text import TextModality
from raft.modalities.text.config import LoraConfig, TextRaftConfig
from raft.modalities.text.model import load_policy
from raft.modalities.text.sft import build_example, collate, label_logprobs
from raft.rankers import score_samples
from raft.rundir import load_state


@dataclass
class PPOSettings:
    learning_rate: float = option(3e-6, "AdamW learning rate of the policy and the value head (TRL's last default).")
    epochs: int = option(4, "PPO epochs over each batch of rollouts.")
    mini_batch_size: int = option(8, "Rollouts per optimizer step.")
    kl_coef: float = option(0.05, "Coefficient of the per-token KL penalty in the reward (the start value if adaptive_kl).")
    adaptive_kl: bool = option(False, "Adapt kl_coef so the KL to the reference tracks target_kl (Ziegler et al. 2019).")
    target_kl: float = option(6.0, "adaptive_kl: target KL to the reference per response, in nats.")
    kl_horizon: int = option(10000, "adaptive_kl: horizon of the proportional controller, in rollouts.")
    cliprange: float = option(0.2, "Clip range of the probability ratio of the policy loss.")
    cliprange_value: float = option(0.2, "Clip range of the value prediction around its rollout-time value.")
    vf_coef: float = option(0.1, "Weight of the value loss.")
    gamma: float = option(1.0, "Discount per token.")
    lam: float = option(0.95, "GAE lambda.")
    whiten_rewards: bool = option(
        False, "Scale each batch's per-token rewards (score + KL penalty) to unit variance, mean kept (TRL's whiten_rewards).")
    whiten_advantages: bool = option(True, "Whiten advantages per batch (mean 0, variance 1 over response tokens).")
    missing_eos_penalty: float | None = option(
        None, "Subtracted from the score of responses that ran out of tokens before EOS (null: none).")
    max_grad_norm: float = option(1.0, "Gradient clipping norm (0: off).")


@dataclass
class TextPPOConfig(TextRaftConfig):
    """The text modality's settings (model, data, generation, rankers, eval, finetune.lora) plus PPO's.

    Per iteration PPO samples samples_per_prompt responses for each of prompts_per_iteration prompts, as RAFT
    does; selection, discard and the rest of finetune are not used."""

    ppo: PPOSettings = option(PPOSettings(), "PPO settings.")

    def validate(self) -> None:
        super().validate()
        p = self.ppo
        _check(p.learning_rate > 0, "ppo.learning_rate", "must be > 0")
        _check(p.epochs >= 1, "ppo.epochs", "must be >= 1")
        _check(p.mini_batch_size >= 1, "ppo.mini_batch_size", "must be >= 1")
        _check(p.kl_coef >= 0, "ppo.kl_coef", "must be >= 0")
        _check(p.target_kl > 0, "ppo.target_kl", "must be > 0")
        _check(p.kl_horizon >= 1, "ppo.kl_horizon", "must be >= 1")
        _check(p.cliprange > 0 and p.cliprange_value > 0, "ppo.cliprange", "and ppo.cliprange_value must be > 0")
        _check(0 <= p.gamma <= 1 and 0 <= p.lam <= 1, "ppo.gamma", "and ppo.lam must be in [0, 1]")


# ----------------------------------------------------------------------------------------------
# the run


def run_ppo(config: TextPPOConfig, resume: bool = False) -> Path:
    """Run (or, with `resume`, continue) PPO as `config` describes; returns the run directory."""
    run_dir = open_run_directory(config, resume, "ppo")
    checkpoint = run_dir.latest_checkpoint()
    parts = TextModality().build(config, checkpoint)  # sampler, ranker, evaluator: the same as RAFT's
    policy, settings = parts.policy.policy, config.ppo
    model = policy.model
    # the log-probabilities of the distribution the rollouts were sampled from (top_p/top_k truncation aside)
    temperature = config.generation.temperature or 1.0
    reference = None if config.finetune.lora.enabled else frozen(load_policy(config.model, LoraConfig(), None).model)
    value_head = torch.nn.Linear(model.config.hidden_size, 1, device=policy.device)
    torch.nn.init.zeros_(value_head.weight)
    torch.nn.init.zeros_(value_head.bias)
    parameters = [p for p in model.parameters() if p.requires_grad] + list(value_head.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=settings.learning_rate)
    kl_coef = settings.kl_coef
    if checkpoint is not None:
        value_head.load_state_dict(load_state(checkpoint / "value_head.pt", map_location=policy.device))
        optimizer.load_state_dict(load_state(checkpoint / "optimizer.pt", map_location=policy.device))
        kl_coef = json.loads((checkpoint / "ppo_state.json").read_text())["kl_coef"]

    def save_checkpoint(directory: Path) -> None:
        model.save_pretrained(directory, safe_serialization=True)  # a peft model saves its adapter only
        policy.tokenizer.save_pretrained(directory)
        torch.save(value_head.state_dict(), directory / "value_head.pt")
        torch.save(optimizer.state_dict(), directory / "optimizer.pt")
        (directory / "ppo_state.json").write_text(json.dumps({"kl_coef": kl_coef}) + "\n")

    done = evaluate_starting_policy(run_dir, parts, config)
    for iteration in range(done + 1, config.iterations + 1):
        if budget_spent(config, run_dir, iteration):
            break
        stage = Stages(config.seed, iteration)
        prompts = draw_prompts(parts.prompts, config.prompts_per_iteration, config.seed, iteration)
        samples = parts.generator.generate(prompts, config.samples_per_prompt, seed=stage("generate"))

        stage("rank")
        score_samples(parts.ranker, samples)

        seed = stage("finetune")
        # the exact sampled tokens: re-encoding the decoded text could give tokens the policy never sampled
        examples = [build_example(policy.encode_prompt(s.prompt), s.meta["token_ids"], config.finetune.max_seq_length)
                    for s in samples]
        batch = collate(examples, policy.tokenizer.pad_token_id, policy.device)
        scores = torch.tensor([s.reward for s in samples], device=policy.device)
        ended = torch.tensor([s.meta.get("finished", True) for s in samples], device=policy.device)
        if settings.missing_eos_penalty is not None:
            scores = scores - settings.missing_eos_penalty * (~ended)
        rollout = make_rollout(model, value_head, reference, batch, scores, kl_coef, temperature, settings)
        stats = ppo_update(model, value_head, optimizer, parameters, batch, rollout, temperature, settings, seed)
        stats["ppo/kl_coef"] = kl_coef
        if settings.adaptive_kl:
            kl_coef = adapt_kl_coef(kl_coef, stats["ppo/kl"], len(samples), settings)

        stage("evaluate")
        eval_metrics, eval_samples = evaluate(parts)

        row = {
            "iteration": iteration,
            "samples": len(samples),
            "reward/policy_mean": mean(s.reward for s in samples),
            "reward/all_mean": mean(s.reward for s in samples),
            "ppo/missing_eos": 1 - ended.float().mean().item(),
            **stats,
            **eval_metrics,
            **stage.times(),
        }
        files = {"samples": samples, "eval_samples": eval_samples}
        run_dir.commit_iteration(iteration, lambda folder: write_samples(folder, parts, iteration, files), row,
                                 save_checkpoint=save_checkpoint, keep_checkpoints=config.keep_checkpoints)
        plot_metrics(run_dir.metrics(), run_dir.path / "metrics.png")
        report(row, config.iterations)

    summarize(run_dir)
    return run_dir.path


def frozen(module: torch.nn.Module) -> torch.nn.Module:
    module.eval()
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module


# ----------------------------------------------------------------------------------------------
# pieces of one PPO iteration


def forward(model, value_head, batch: dict, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per position t of [batch, length - 1]: log pi(token t + 1), the value of the state before it, the mask."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    logprobs, mask = label_logprobs(out.logits, batch["labels"], temperature)
    values = value_head(out.hidden_states[-1][:, :-1].float()).squeeze(-1)
    return logprobs, values * mask, mask


@torch.no_grad()
def reference_logprobs(model, reference, batch: dict, temperature: float) -> torch.Tensor:
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if reference is None:  # LoRA: the reference is the base model, i.e. the policy with its adapter off
        with model.disable_adapter():
            logits = model(**inputs).logits
    else:
        logits = reference(**inputs).logits
    return label_logprobs(logits, batch["labels"], temperature)[0]


def token_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                  kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token rewards, per-token KL estimate): the KL penalty on every response token, the score on the last."""
    kl = (logprobs - ref_logprobs) * mask  # k1 estimator; its sum over a sampled response estimates the KL
    rewards = -kl_coef * kl
    last = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(1)
    rows = torch.arange(mask.shape[0], device=mask.device)
    rewards[rows, last] += scores * mask.any(1)  # a response with no tokens left has nowhere to put its score
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) by generalised advantage estimation; the response ends where the mask does."""
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    length = rewards.shape[1]
    for t in reversed(range(length)):
        going_on = mask[:, t + 1].float() if t + 1 < length else torch.zeros_like(running)
        next_value = values[:, t + 1] * going_on if t + 1 < length else 0.0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * going_on * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    average = masked_mean(x, mask)
    whitened = (x - average) * torch.rsqrt(masked_mean((x - average) ** 2, mask) + 1e-8)
    return (whitened if shift_mean else whitened + average) * mask


@torch.no_grad()
def make_rollout(model, value_head, reference, batch: dict, scores: torch.Tensor, kl_coef: float,
                 temperature: float, settings: PPOSettings) -> dict[str, torch.Tensor]:
    """Old log-probabilities and values, rewards, advantages and returns of a batch of sampled responses."""
    chunks = []
    for start in range(0, batch["input_ids"].shape[0], settings.mini_batch_size):
        part = {k: v[start : start + settings.mini_batch_size] for k, v in batch.items()}
        logprobs, values, mask = forward(model, value_head, part, temperature)
        chunks.append((logprobs, values, mask, reference_logprobs(model, reference, part, temperature)))
    logprobs, values, mask, ref_logprobs = (torch.cat(parts) for parts in zip(*chunks))
    rewards, kl = token_rewards(scores, logprobs, ref_logprobs, mask, kl_coef)
    if settings.whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    advantages, returns = gae(rewards, values, mask, settings.gamma, settings.lam)
    if settings.whiten_advantages:
        advantages = masked_whiten(advantages, mask)
    return {"logprobs": logprobs, "values": values, "rewards": rewards, "advantages": advantages, "returns": returns,
            "kl": kl.sum(1)}


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                cliprange: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate (to minimise) and the share of tokens where the clip was binding."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - cliprange, 1 + cliprange)
    return masked_mean(torch.maximum(unclipped, clipped), mask), masked_mean((clipped > unclipped).float(), mask)


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange_value: float) -> torch.Tensor:
    clipped = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


def ppo_update(model, value_head, optimizer, parameters, batch: dict, rollout: dict, temperature: float,
               settings: PPOSettings, seed: int) -> dict[str, float]:
    """settings.epochs passes over the rollouts in shuffled mini-batches; returns the mean statistics."""
    order_generator = torch.Generator().manual_seed(seed)
    count = batch["input_ids"].shape[0]
    stats: dict[str, list[float]] = {k: [] for k in ("train/loss", "ppo/policy_loss", "ppo/value_loss",
                                                      "ppo/clipfrac", "ppo/approx_kl")}
    for _ in range(settings.epochs):
        for rows in torch.randperm(count, generator=order_generator).split(settings.mini_batch_size):
            rows = rows.to(batch["input_ids"].device)
            width = int(batch["attention_mask"][rows].sum(1).max())  # right padding: drop all-padding columns
            part = {k: v[rows, :width] for k, v in batch.items()}
            old = {k: v[rows, : width - 1] for k, v in rollout.items() if v.dim() == 2}
            logprobs, values, mask = forward(model, value_head, part, temperature)
            pg_loss, clipfrac = policy_loss(logprobs, old["logprobs"], old["advantages"], mask, settings.cliprange)
            vf_loss = value_loss(values, old["values"], old["returns"], mask, settings.cliprange_value)
            loss = pg_loss + settings.vf_coef * vf_loss
            loss.backward()
            if settings.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(parameters, settings.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            approx_kl = 0.5 * masked_mean((logprobs - old["logprobs"]) ** 2, mask)
            for key, value in zip(stats, (loss, pg_loss, vf_loss, clipfrac, approx_kl)):
                stats[key].append(value.item())
    return {**{k: mean(v) for k, v in stats.items()}, "ppo/kl": rollout["kl"].mean().item(),
            "ppo/steps": settings.epochs * len(range(0, count, settings.mini_batch_size))}


def adapt_kl_coef(kl_coef: float, kl: float, rollouts: int, settings: PPOSettings) -> float:
    """Ziegler et al.'s proportional controller: move kl_coef so the KL per response approaches target_kl."""
    error = min(max(kl / settings.target_kl - 1, -0.2), 0.2)
    return kl_coef * (1 + error * rollouts / settings.kl_horizon)
