"""RRHF (Yuan et al. 2023, "Rank Responses to align Human Feedback"): the K scored candidates of a prompt
are ranked by the policy's length-normalised log-likelihood, and pairs the policy orders against the reward
are penalised; the best candidate also gets the supervised loss.

    p_i    = sum_t log pi(y_i,t | x, y_i,<t) / |y_i| ** length_penalty      (response tokens only)
    L_rank = sum over pairs with r_i < r_j of max(0, p_i - p_j)
    L      = rrhf_weight * L_rank + NLL of the best candidate (mean over its tokens)

It runs in the RAFT loop unchanged: the same generation and ranking stages, `selection.strategy=all` keeps
every candidate, and this fine-tuner groups them by prompt.
"""

from __future__ import annotations

import torch

from raft.finetune.losses import rrhf_loss  # noqa: F401 (the loss; also imported from here)
from raft.interface import Sample
from raft.modalities.text.sft import TextFineTuner, collate, label_logprobs


class RrhfFineTuner(TextFineTuner):
    """A fine-tuning step draws `finetune.batch_size` prompts, each with all its kept candidates."""

    def units(self, selected: list[Sample]) -> list:
        groups: dict[int, list[Sample]] = {}
        for sample in selected:
            groups.setdefault(sample.prompt_index, []).append(sample)
        # ranked by the ranking score: the reward, minus beta * KL under KL-regularized ranking
        return [([self.example(s) for s in group], [s.ranking_score for s in group]) for group in groups.values()]

    def step_loss(self, chunks: list[list], padding: list | None = None) -> dict[str, float]:
        """Mean over the step's prompts (of every process) of each prompt's RRHF loss; a micro-batch holds whole
        prompts."""
        config, device, trainer = self.config, self.policy.device, self.trainer
        prompts = max(trainer.reduce({"prompts": float(sum(len(chunk) for chunk in chunks))})["prompts"], 1.0)

        def loss_of(chunk):
            examples = [example for group, _ in chunk for example in group]
            batch = collate(examples, self.policy.tokenizer.pad_token_id, device)
            logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            logprobs, mask = label_logprobs(logits, batch["labels"])
            sums, lengths = logprobs.sum(-1), mask.sum(-1).clamp(min=1)
            loss, start = 0.0, 0
            totals = {"train/loss": 0.0, "train/rank_loss": 0.0, "train/sft_loss": 0.0}
            for group, rewards in chunk:
                end = start + len(group)
                total, rank, nll = rrhf_loss(sums[start:end], lengths[start:end],
                                             torch.tensor(rewards, device=device), config.rrhf_weight,
                                             config.length_penalty)
                loss, start = loss + total, end
                for key, value in zip(totals, (total, rank, nll)):
                    totals[key] += value.item() / prompts
            return loss / prompts, totals

        keys = ["train/loss", "train/rank_loss", "train/sft_loss"]
        return trainer.reduce(trainer.accumulate(chunks, loss_of, padding), keys)
