"""Supervised fine-tuning on the kept (prompt, response) pairs: loss on response tokens only, one example
per sequence (no packing), token-weighted mean over each optimizer step."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from raft.interface import FineTuner, Sample
from raft.metrics import mean
from raft.modalities.text.config import TextFinetuneConfig
from raft.modalities.text.model import TextPolicy

IGNORE = -100  # label of tokens that carry no loss (prompt and padding)


def build_example(prompt_ids: list[int], response_ids: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels): prompt tokens are labelled IGNORE; long prompts lose their left end first."""
    response_ids = response_ids[:max_length]
    prompt_ids = prompt_ids[max(0, len(prompt_ids) - (max_length - len(response_ids))) :]
    return prompt_ids + response_ids, [IGNORE] * len(prompt_ids) + response_ids


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Right-pads a micro-batch; padding is masked out of attention and loss."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = [ids + [pad_id] * (width - len(ids)) for ids, _ in examples]
    labels = [labels + [IGNORE] * (width - len(labels)) for _, labels in examples]
    mask = [[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in examples]
    as_tensor = lambda rows: torch.tensor(rows, dtype=torch.long, device=device)
    return {"input_ids": as_tensor(input_ids), "attention_mask": as_tensor(mask), "labels": as_tensor(labels)}


def label_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each labelled token under `logits / temperature` (0 elsewhere), and the label mask.

    Both are [batch, length - 1]: position t holds token t + 1, which is predicted from positions <= t."""
    targets = labels[:, 1:]
    mask = targets != IGNORE
    logits = logits[:, :-1].float()
    if temperature != 1.0:  # a [batch, length, vocabulary] copy: only when it changes something
        logits = logits / temperature
    logprobs = torch.log_softmax(logits, dim=-1)
    picked = logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked * mask, mask


def response_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed negative log-likelihood of the labelled tokens, and their count."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logprobs, mask = label_logprobs(logits, batch["labels"])
    return -logprobs.sum(), int(mask.sum())


def lm_example(ids: list[int]) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for the plain LM loss on a text: every token but the first is predicted."""
    return ids, [IGNORE] + ids[1:]


class TextFineTuner(FineTuner):
    def __init__(self, policy: TextPolicy, config: TextFinetuneConfig, checkpoint: Path | None, progress: bool = True,
                 replay_texts: list[str] = ()):
        """`replay_texts`: reference texts for `config.replay` (the LM loss on them joins every step)."""
        self.policy, self.config, self.progress = policy, config, progress
        self.replay = [lm_example(policy.tokenizer(t, add_special_tokens=True)["input_ids"][: config.replay.max_tokens])
                       for t in replay_texts] if config.replay.share > 0 else []
        self.optimizer = None
        if config.gradient_checkpointing:
            policy.model.gradient_checkpointing_enable()
        state = checkpoint / "optimizer.pt" if checkpoint is not None else None
        if config.carry_optimizer_state and state is not None and state.is_file():
            self.optimizer = self._new_optimizer()
            self.optimizer.load_state_dict(torch.load(state, map_location=policy.device, weights_only=True))

    def _new_optimizer(self) -> torch.optim.Optimizer:
        parameters = [p for p in self.policy.model.parameters() if p.requires_grad]
        return torch.optim.AdamW(parameters, lr=self.config.learning_rate, weight_decay=self.config.weight_decay)

    def example(self, sample: Sample) -> tuple[list[int], list[int]]:
        tokenizer = self.policy.tokenizer
        response = tokenizer(sample.output, add_special_tokens=False)["input_ids"]
        if sample.meta.get("finished", True):  # teach it to stop only where the sample stopped
            response = response + [tokenizer.eos_token_id]
        return build_example(self.policy.encode_prompt(sample.prompt), response, self.config.max_seq_length)

    def units(self, selected: list[Sample]) -> list:
        """What one optimizer step draws from: here one example per kept sample."""
        return [self.example(s) for s in selected]

    def finetune(self, selected: list[Sample], seed: int) -> dict[str, float]:
        config, model = self.config, self.policy.model
        torch.manual_seed(seed)
        units = self.units(selected)
        optimizer = self.optimizer if self.optimizer is not None else self._new_optimizer()
        if config.carry_optimizer_state:
            self.optimizer = optimizer
        micro = config.batch_size // config.gradient_accumulation_steps
        order_generator = torch.Generator().manual_seed(seed)
        steps = [order[i : i + config.batch_size]
                 for order in (torch.randperm(len(units), generator=order_generator).tolist() for _ in range(config.epochs))
                 for i in range(0, len(units), config.batch_size)]

        replayed = self.replay_order(seed, sum(math.ceil(config.replay.share * len(step)) for step in steps))

        model.train()
        step_metrics = []
        for step in tqdm(steps, desc=f"fine-tuning on {len(units)}", disable=not self.progress, leave=False):
            chunks = [[units[i] for i in step[j : j + micro]] for j in range(0, len(step), micro)]
            step_metrics.append(self.step_loss(chunks))
            if replayed:
                count = math.ceil(config.replay.share * len(step))
                texts, replayed = replayed[:count], replayed[count:]
                step_metrics[-1]["train/replay_loss"] = self.replay_loss(texts, micro)
            if config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        model.eval()
        names = step_metrics[0] if step_metrics else ["train/loss"]
        return {**{k: mean(m[k] for m in step_metrics) for k in names}, "train/steps": len(steps)}

    def step_loss(self, chunks: list[list]) -> dict[str, float]:
        """Backpropagates one optimizer step's loss, micro-batch by micro-batch; returns its metrics.

        The loss is the mean over the step's response tokens, whatever the micro-batching."""
        batches = [collate(chunk, self.policy.tokenizer.pad_token_id, self.policy.device) for chunk in chunks]
        tokens = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
        step_loss = 0.0
        for batch in batches:
            nll, _ = response_nll(self.policy.model, batch)
            (nll / max(tokens, 1)).backward()
            step_loss += nll.item()
        return {"train/loss": step_loss / max(tokens, 1)}

    def replay_order(self, seed: int, count: int) -> list[tuple[list[int], list[int]]]:
        """`count` replay examples for this iteration: seeded passes over the reference texts, no repeats within one."""
        if not self.replay or count == 0:
            return []
        generator = torch.Generator().manual_seed(seed + 1)
        order: list[int] = []
        while len(order) < count:
            order += torch.randperm(len(self.replay), generator=generator).tolist()
        return [self.replay[i] for i in order[:count]]

    def replay_loss(self, examples: list, micro: int) -> float:
        """Backpropagates weight x the LM loss (mean over the texts' tokens) of replayed reference texts."""
        batches = [collate(examples[i : i + micro], self.policy.tokenizer.pad_token_id, self.policy.device)
                   for i in range(0, len(examples), micro)]
        tokens = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
        total = 0.0
        for batch in batches:
            nll, _ = response_nll(self.policy.model, batch)
            (self.config.replay.weight * nll / max(tokens, 1)).backward()
            total += nll.item()
        return total / max(tokens, 1)

    def save_checkpoint(self, directory: Path) -> None:
        self.policy.model.save_pretrained(directory, safe_serialization=True)  # a peft model saves its adapter only
        self.policy.tokenizer.save_pretrained(directory)
        if self.config.carry_optimizer_state and self.optimizer is not None:
            torch.save(self.optimizer.state_dict(), directory / "optimizer.pt")
