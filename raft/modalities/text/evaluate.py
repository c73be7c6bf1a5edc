"""Held-out text metrics: perplexity on reference texts, diversity and length of the policy's samples."""

from __future__ import annotations

import math

import torch

from raft.interface import Evaluator, Sample
from raft.metrics import distinct_n, mean
from raft.modalities.text.model import TextPolicy, picked_logprobs
from raft.modalities.text.sft import IGNORE, collate


class TextEvaluator(Evaluator):
    def __init__(self, policy: TextPolicy, reference_texts: list[str], batch_size: int, max_tokens: int,
                 perplexity_every: int | None = None):
        """`perplexity_every`: perplexity at the start, at the evaluations of every this many iterations and at the
        last one (None: at every evaluation)."""
        self.policy, self.batch_size, self.perplexity_every = policy, batch_size, perplexity_every
        tokenizer = policy.tokenizer
        # every token after the first is predicted, so every one but the first is labelled
        self.examples = []
        for text in reference_texts:
            ids = tokenizer(text, add_special_tokens=True)["input_ids"][:max_tokens]
            self.examples.append((ids, [IGNORE] + ids[1:]))

    def evaluate(self, eval_samples: list[Sample], iteration: int = 0, last: bool = True) -> dict[str, float]:
        texts = [s.output for s in eval_samples]
        metrics = {
            "eval/distinct_1": distinct_n(texts, 1),
            "eval/distinct_2": distinct_n(texts, 2),
            "eval/mean_words": mean(len(t.split()) for t in texts),
        }
        every = self.perplexity_every
        if self.examples and (every is None or last or iteration % every == 0):
            metrics["eval/perplexity"] = self.perplexity()
        return metrics

    @torch.no_grad()
    def perplexity(self) -> float:
        total, count = 0.0, 0
        model = self.policy.inference_model()
        for start in range(0, len(self.examples), self.batch_size):
            batch = collate(self.examples[start : start + self.batch_size], self.policy.tokenizer.pad_token_id,
                            self.policy.device)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
            targets = batch["labels"][:, 1:]
            mask = targets != IGNORE
            picked = picked_logprobs(logits, targets.clamp(min=0))  # a full log_softmax was a sixth of the time on CPU
            total, count = total - (picked * mask).sum().item(), count + int(mask.sum())
        return math.exp(total / count) if count else math.nan
