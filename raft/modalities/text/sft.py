"""Supervised fine-tuning on the kept (prompt, response) pairs: loss on response tokens only, one example
per sequence (no packing), token-weighted mean over each optimizer step."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from raft.finetune import distributed
from raft.finetune.trainer import Trainer, TrainerSettings
from raft.interface import FineTuner, Sample
from raft.metrics import mean
from raft.modalities.text.config import TextFinetuneConfig
from raft.modalities.text.model import TextPolicy, enable_activation_checkpointing
from raft.modalities.text.reference import response_ids

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
    """RAFT's supervised objective on the kept samples (plus reference replay), trained by raft.finetune.Trainer.

    Subclasses change what a step is made of (`units`) and how its micro-batches are backpropagated (`step_loss`)."""

    def __init__(self, policy: TextPolicy, config: TextFinetuneConfig, checkpoint: Path | None, progress: bool = True,
                 replay_texts: list[str] = ()):
        """`replay_texts`: reference texts for `config.replay` (the LM loss on them joins every step)."""
        self.policy, self.config, self.progress = policy, config, progress
        self.replay = [lm_example(policy.tokenizer(t, add_special_tokens=True)["input_ids"][: config.replay.max_tokens])
                       for t in replay_texts] if config.replay.share > 0 else []
        if config.gradient_checkpointing:
            enable_activation_checkpointing(policy.model)
        self.trainer = Trainer(policy.model, TrainerSettings.from_finetune_config(config), checkpoint, policy.device)

    @property
    def optimizer(self):
        """The AdamW state carried across iterations (None when each iteration starts afresh)."""
        return self.trainer.optimizer if self.config.carry_optimizer_state and self.trainer.started else None

    def example(self, sample: Sample) -> tuple[list[int], list[int]]:
        """The kept sample as a training example: the response's token ids exactly as the policy sampled them (EOS
        included where it stopped), or, for text from elsewhere, its text tokenized. Decoding and re-encoding is not
        the identity: the decoded reply loses the leading space of its first token, among other things."""
        return build_example(self.policy.encode_prompt(sample.prompt), response_ids(self.policy, sample),
                             self.config.max_seq_length)

    def units(self, selected: list[Sample]) -> list:
        """What one optimizer step draws from: here one example per kept sample."""
        return [self.example(s) for s in selected]

    def finetune(self, selected: list[Sample], seed: int) -> dict[str, float]:
        config, model, trainer = self.config, self.policy.model, self.trainer
        torch.manual_seed(seed)
        units = self.units(selected)
        trainer.start()
        # micro-batches of one process: the step's share of each process, cut into gradient_accumulation_steps
        micro = max(1, config.batch_size // config.gradient_accumulation_steps // trainer.num_processes)
        order_generator = torch.Generator().manual_seed(seed)
        steps = [order[i : i + config.batch_size]
                 for order in (torch.randperm(len(units), generator=order_generator).tolist() for _ in range(config.epochs))
                 for i in range(0, len(units), config.batch_size)]

        replayed = self.replay_order(seed, sum(math.ceil(config.replay.share * len(step)) for step in steps))

        model.train()
        step_metrics = []
        for step in tqdm(steps, desc=f"fine-tuning on {len(units)}", disable=not self.progress, leave=False):
            mine = distributed.shard(step)
            chunks = [[units[i] for i in mine[j : j + micro]] for j in range(0, len(mine), micro)]
            step_metrics.append(self.step_loss(chunks, padding=[units[step[0]]]))
            if replayed:
                count = math.ceil(config.replay.share * len(step))
                texts, replayed = replayed[:count], replayed[count:]
                step_metrics[-1]["train/replay_loss"] = self.replay_loss(distributed.shard(texts), micro,
                                                                         padding=texts[:1])
            trainer.step()
        model.eval()
        names = step_metrics[0] if step_metrics else ["train/loss"]
        return {**{k: mean(m[k] for m in step_metrics) for k in names}, "train/steps": len(steps)}

    def step_loss(self, chunks: list[list], padding: list | None = None) -> dict[str, float]:
        """Backpropagates this process's micro-batches (`chunks`) of one optimizer step; returns the step's
        metrics. The loss is the mean over the step's response tokens (of every process), whatever the
        micro-batching."""
        batches = [collate(chunk, self.policy.tokenizer.pad_token_id, self.policy.device) for chunk in chunks]
        tokens = self.trainer.reduce({"tokens": sum(float((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)})
        tokens = max(tokens["tokens"], 1.0)

        def loss_of(batch):
            nll, _ = response_nll(self.trainer.model, batch)
            return nll / tokens, {"train/loss": nll.item() / tokens}

        padding = collate(padding, self.policy.tokenizer.pad_token_id, self.policy.device) if padding else None
        return self.trainer.reduce(self.trainer.accumulate(batches, loss_of, padding), ["train/loss"])

    def replay_order(self, seed: int, count: int) -> list[tuple[list[int], list[int]]]:
        """`count` replay examples for this iteration: seeded passes over the reference texts, no repeats within one."""
        if not self.replay or count == 0:
            return []
        generator = torch.Generator().manual_seed(seed + 1)
        order: list[int] = []
        while len(order) < count:
            order += torch.randperm(len(self.replay), generator=generator).tolist()
        return [self.replay[i] for i in order[:count]]

    def replay_loss(self, examples: list, micro: int, padding: list | None = None) -> float:
        """Backpropagates weight x the LM loss (mean over the texts' tokens, of every process) of replayed
        reference texts; returns that mean."""
        batches = [collate(examples[i : i + micro], self.policy.tokenizer.pad_token_id, self.policy.device)
                   for i in range(0, len(examples), micro)]
        tokens = self.trainer.reduce({"tokens": sum(float((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)})
        tokens = max(tokens["tokens"], 1.0)

        def loss_of(batch):
            nll, _ = response_nll(self.trainer.model, batch)
            return self.config.replay.weight * nll / tokens, {"replay": nll.item() / tokens}

        padding = collate(padding, self.policy.tokenizer.pad_token_id, self.policy.device) if padding else None
        return self.trainer.reduce(self.trainer.accumulate(batches, loss_of, padding), ["replay"])["replay"]

    def save_checkpoint(self, directory: Path | None) -> None:
        state = self.trainer.model_state()  # collective under sharded training: every process calls this
        if directory is None:  # not the main process
            return
        # a peft model saves its adapter only
        self.policy.model.save_pretrained(directory, safe_serialization=True, state_dict=state)
        self.policy.tokenizer.save_pretrained(directory)
        self.trainer.save_optimizer(directory)
