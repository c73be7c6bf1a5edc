"""PPO as a fine-tuning objective of the RAFT loop (`finetune.objective=ppo`, `raft ppo`).

The loop samples, ranks and hands over every sample of the iteration (TextPPOConfig fixes selection.strategy
all, no discard rule); this fine-tuner turns them into one PPO batch:

- a value head on the policy's last hidden state (zero-initialised: no reward model to start it from);
- the reference is the loop's (raft/modalities/text/reference.py): the starting model, or under LoRA the same
  model with its adapter disabled (no second copy);
- per-token reward: -kl_coef * (log pi - log pi_ref) on every response token, plus the ranker's score on the
  last one (EOS when the response ended; missing_eos_penalty otherwise); optional reward whitening;
- GAE over response tokens, advantages whitened per batch;
- ppo.epochs passes of clipped policy and value losses in mini-batches, each an optimizer step of the Trainer;
  kl_coef fixed or adapted towards target_kl between iterations.

The losses are raft/finetune/losses.py's. Checkpoints hold the policy, value_head.pt, optimizer.pt and
ppo_state.json (kl_coef), so a resumed run continues exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from raft.finetune import distributed
from raft.finetune.losses import gae, masked_mean, masked_whiten, policy_loss, token_rewards, value_loss
from raft.finetune.trainer import Trainer, TrainerSettings
from raft.interface import META_FINISHED, META_TOKEN_IDS, FineTuner, Sample
from raft.metrics import mean
from raft.modalities.text.config import PPOSettings, TextFinetuneConfig
from raft.modalities.text.model import TextPolicy, enable_activation_checkpointing
from raft.modalities.text.reference import TextReference
from raft.rundir import load_state
from raft.modalities.text.sft import build_example, collate, label_logprobs

VALUE_HEAD_FILE, STATE_FILE = "value_head.pt", "ppo_state.json"
STATS = ("train/loss", "ppo/policy_loss", "ppo/value_loss", "ppo/clipfrac", "ppo/approx_kl")


class PolicyWithValueHead(torch.nn.Module):
    """The policy and its value head as one module, so the data-parallel wrapper syncs both."""

    def __init__(self, model: torch.nn.Module, value_head: torch.nn.Linear):
        super().__init__()
        self.model, self.value_head = model, value_head

    def forward(self, input_ids, attention_mask, labels, temperature: float = 1.0):
        """Per position t of [batch, length - 1]: log pi(token t + 1), the value of the state before it, the mask."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        logprobs, mask = label_logprobs(out.logits, labels, temperature)
        values = self.value_head(out.hidden_states[-1][:, :-1].float()).squeeze(-1)
        return logprobs, values * mask, mask


def new_value_head(hidden_size: int, device) -> torch.nn.Linear:
    head = torch.nn.Linear(hidden_size, 1, device=device)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    return head


@torch.no_grad()
def make_rollout(module: PolicyWithValueHead, reference: TextReference, batch: dict, scores: torch.Tensor,
                 kl_coef: float, temperature: float, settings: PPOSettings) -> dict[str, torch.Tensor]:
    """Old log-probabilities and values, rewards, advantages and returns of a batch of sampled responses."""
    chunks = []
    for start in range(0, batch["input_ids"].shape[0], settings.mini_batch_size):
        part = {k: v[start : start + settings.mini_batch_size] for k, v in batch.items()}
        logprobs, values, mask = module(**part, temperature=temperature)
        chunks.append((logprobs, values, mask, reference.token_logprobs(part, temperature)))
    logprobs, values, mask, ref_logprobs = (torch.cat(parts) for parts in zip(*chunks))
    rewards, kl = token_rewards(scores, logprobs, ref_logprobs, mask, kl_coef)
    if settings.whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    advantages, returns = gae(rewards, values, mask, settings.gamma, settings.lam)
    if settings.whiten_advantages:
        advantages = masked_whiten(advantages, mask)
    return {"logprobs": logprobs, "values": values, "rewards": rewards, "advantages": advantages, "returns": returns,
            "kl": kl.sum(1)}


def ppo_update(trainer: Trainer, batch: dict, rollout: dict, temperature: float, settings: PPOSettings,
               seed: int) -> dict[str, float]:
    """settings.epochs passes over the rollouts in shuffled mini-batches, one optimizer step each (each process
    its share of a mini-batch's rows); returns the mean statistics."""
    order_generator = torch.Generator().manual_seed(seed)
    count = batch["input_ids"].shape[0]
    stats: dict[str, list[float]] = {k: [] for k in STATS}
    for _ in range(settings.epochs):
        for rows in torch.randperm(count, generator=order_generator).split(settings.mini_batch_size):
            rows = rows.to(batch["input_ids"].device)
            tokens = float(batch["labels"][rows, 1:].ne(-100).sum())  # the mini-batch's, over every process
            mine = distributed.shard(rows.tolist())

            def loss_of(part_rows):
                part_rows = torch.tensor(part_rows, device=rows.device)
                width = int(batch["attention_mask"][part_rows].sum(1).max())  # right padding: drop padding columns
                part = {k: v[part_rows, :width] for k, v in batch.items()}
                old = {k: v[part_rows, : width - 1] for k, v in rollout.items() if v.dim() == 2}
                logprobs, values, mask = trainer.model(**part, temperature=temperature)
                pg_loss, clipfrac = policy_loss(logprobs, old["logprobs"], old["advantages"], mask,
                                                settings.cliprange, tokens)
                vf_loss = value_loss(values, old["values"], old["returns"], mask, settings.cliprange_value, tokens)
                loss = pg_loss + settings.vf_coef * vf_loss
                approx_kl = 0.5 * masked_mean((logprobs.detach() - old["logprobs"]) ** 2, mask, tokens)
                return loss, {k: v.item() for k, v in zip(STATS, (loss, pg_loss, vf_loss, clipfrac, approx_kl))}

            metrics = trainer.accumulate([mine] if mine else [], loss_of, padding=rows[:1].tolist())
            trainer.step()
            for key, value in trainer.reduce(metrics, STATS).items():
                stats[key].append(value)
    return {**{k: mean(v) for k, v in stats.items()}, "ppo/kl": rollout["kl"].mean().item(),
            "ppo/steps": settings.epochs * len(range(0, count, settings.mini_batch_size))}


def adapt_kl_coef(kl_coef: float, kl: float, rollouts: int, settings: PPOSettings) -> float:
    """Ziegler et al.'s proportional controller: move kl_coef so the KL per response approaches target_kl."""
    error = min(max(kl / settings.target_kl - 1, -0.2), 0.2)
    return kl_coef * (1 + error * rollouts / settings.kl_horizon)


class PPOFineTuner(FineTuner):
    def __init__(self, policy: TextPolicy, finetune: TextFinetuneConfig, settings: PPOSettings,
                 reference: TextReference, temperature: float, checkpoint: Path | None):
        """`temperature`: the sampling temperature of the rollouts (their log-probabilities are taken at it)."""
        self.policy, self.config, self.settings, self.reference = policy, finetune, settings, reference
        self.temperature = temperature or 1.0  # greedy rollouts: the untempered distribution
        self.kl_coef = settings.kl_coef
        value_head = new_value_head(policy.model.config.hidden_size, policy.device)
        if checkpoint is not None:
            value_head.load_state_dict(load_state(checkpoint / VALUE_HEAD_FILE, map_location=policy.device))
            self.kl_coef = json.loads((checkpoint / STATE_FILE).read_text())["kl_coef"]
        if finetune.gradient_checkpointing:
            enable_activation_checkpointing(policy.model)
        self.module = PolicyWithValueHead(policy.model, value_head)
        # PPO's optimizer state always carries over (one run is one optimisation); weight decay: AdamW's default
        self.trainer = Trainer(self.module, TrainerSettings(settings.learning_rate, 0.01, settings.max_grad_norm, True,
                                                            finetune.mixed_precision), checkpoint, policy.device)

    def finetune(self, selected: list[Sample], seed: int) -> dict[str, float]:
        policy, settings = self.policy, self.settings
        missing = [i for i, s in enumerate(selected) if s.meta.get(META_TOKEN_IDS) is None]
        if missing:  # TextPPOConfig admits the policy's own samples only, which carry them
            raise ValueError(f"PPO needs the sampled token ids; sample {missing[0]} has none")
        torch.manual_seed(seed)
        # the exact sampled tokens: re-encoding the decoded text could give tokens the policy never sampled
        examples = [build_example(policy.encode_prompt(s.prompt), s.meta[META_TOKEN_IDS], self.config.max_seq_length)
                    for s in selected]
        batch = collate(examples, policy.tokenizer.pad_token_id, policy.device)
        scores = torch.tensor([s.reward for s in selected], device=policy.device)
        ended = torch.tensor([s.meta.get(META_FINISHED, True) for s in selected], device=policy.device)
        if settings.missing_eos_penalty is not None:
            scores = scores - settings.missing_eos_penalty * (~ended)
        self.trainer.start()
        rollout = make_rollout(self.module, self.reference, batch, scores, self.kl_coef, self.temperature, settings)
        stats = ppo_update(self.trainer, batch, rollout, self.temperature, settings, seed)
        stats["ppo/kl_coef"] = self.kl_coef
        stats["ppo/missing_eos"] = 1 - ended.float().mean().item()
        if settings.adaptive_kl:
            self.kl_coef = adapt_kl_coef(self.kl_coef, stats["ppo/kl"], len(selected), settings)
        return stats

    def save_checkpoint(self, directory: Path | None) -> None:
        self.trainer.model_state()  # collective under sharded training: every process takes part
        if directory is None:  # not the main process
            return
        self.policy.model.save_pretrained(directory, safe_serialization=True)  # a peft model saves its adapter only
        self.policy.tokenizer.save_pretrained(directory)
        torch.save(self.module.value_head.state_dict(), directory / VALUE_HEAD_FILE)
        self.trainer.save_optimizer(directory)
        (directory / STATE_FILE).write_text(json.dumps({"kl_coef": self.kl_coef}) + "\n")
