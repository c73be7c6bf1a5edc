"""The starting policy as a reference: per-sample log-ratios (KL-regularized ranking) and KL to the start.

Under LoRA the reference is the policy with its adapter disabled (no second copy of the weights); under full
fine-tuning it is a frozen copy of the starting model. Both distributions are taken at the sampling
temperature, the distribution the responses were drawn from, and scored on the token ids actually sampled
(text that came from a file or a server, which has none, is tokenized).
"""

from __future__ import annotations

import contextlib
import copy

import torch

from raft.interface import ReferenceModel, Sample
from raft.modalities.text.model import TextPolicy
from raft.modalities.text.sft import IGNORE, build_example, collate


def response_ids(policy: TextPolicy, sample: Sample) -> list[int]:
    """The response's token ids as sampled (EOS included when it stopped), or its text tokenized."""
    if sample.meta.get("token_ids") is not None:
        return list(sample.meta["token_ids"])
    ids = policy.tokenizer(sample.output, add_special_tokens=False)["input_ids"]
    return ids + [policy.tokenizer.eos_token_id] if sample.meta.get("finished", True) else ids


class TextReference(ReferenceModel):
    def __init__(self, policy: TextPolicy, load_start: callable, temperature: float, max_length: int,
                 batch_size: int = 8):
        """`load_start()` returns the starting model; it is only called under full fine-tuning."""
        self.policy, self.max_length, self.batch_size = policy, max_length, batch_size
        self.temperature = temperature if temperature > 0 else 1.0
        self.adapter = hasattr(policy.model, "disable_adapter")  # a peft model
        self.frozen = None
        self._load_start = load_start

    def _reference(self):
        """A context in which `forward` runs the starting model."""
        if self.adapter:
            return self.policy.model.disable_adapter()
        return contextlib.nullcontext()

    def _frozen_model(self) -> torch.nn.Module:
        if self.frozen is None:
            self.frozen = self._load_start().to(self.policy.device).eval()
            for parameter in self.frozen.parameters():
                parameter.requires_grad_(False)
        return self.frozen

    @torch.no_grad()
    def measure(self, samples: list[Sample]) -> tuple[list[float], list[float]]:
        """(log-ratio of the sampled tokens, exact KL) per sample, each summed over the response."""
        policy = self.policy
        examples = [build_example(policy.encode_prompt(s.prompt), response_ids(policy, s), self.max_length)
                    for s in samples]
        ratios, kls = [], []
        was_training = policy.model.training
        policy.model.eval()
        for start in range(0, len(examples), self.batch_size):
            batch = collate(examples[start : start + self.batch_size], policy.tokenizer.pad_token_id, policy.device)
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            mine = self._logprobs(policy.model(**inputs).logits)
            if self.adapter:
                with self._reference():
                    theirs = self._logprobs(policy.model(**inputs).logits)
            else:
                theirs = self._logprobs(self._frozen_model()(**inputs).logits)
            targets = batch["labels"][:, 1:]
            mask = (targets != IGNORE).to(mine.dtype)
            index = targets.clamp(min=0).unsqueeze(-1)
            ratio = (mine.gather(-1, index) - theirs.gather(-1, index)).squeeze(-1)
            kl = (mine.exp() * (mine - theirs)).sum(-1)
            ratios += (ratio * mask).sum(-1).tolist()
            kls += (kl * mask).sum(-1).tolist()
        policy.model.train(was_training)
        return ratios, kls

    def _logprobs(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(logits[:, :-1].float() / self.temperature, dim=-1)

    def log_ratios(self, samples: list[Sample]) -> list[float]:
        return self.measure(samples)[0]

    def kl_to_start(self, samples: list[Sample]) -> list[float]:
        return self.measure(samples)[1]


def starting_model_loader(policy: TextPolicy, model_config, checkpoint) -> callable:
    """How to get the starting weights under full fine-tuning: a copy of the policy before it was trained, or,
    when resuming (the policy holds a checkpoint's weights), the configured model loaded again."""
    if checkpoint is None:
        snapshot = copy.deepcopy(policy.model).cpu() if not hasattr(policy.model, "disable_adapter") else None
        return lambda: snapshot
    from raft.modalities.text.config import LoraConfig
    from raft.modalities.text.model import load_policy

    return lambda: load_policy(model_config, LoraConfig(), None).model
