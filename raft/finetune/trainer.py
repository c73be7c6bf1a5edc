"""One trainer for every objective and modality, built on accelerate.

The Accelerator owns what differs between one CPU and 16 GPUs: the distributed wrapper (DDP, or a DeepSpeed
ZeRO-2 engine, from the `accelerate launch` config; FSDP and ZeRO-3 are refused, see `refuse_sharded_weights`),
mixed precision, gradient synchronisation across micro-batches (no_sync on all but the last; accelerate's
sync_gradients flag also tells a DeepSpeed engine where a step ends) and gradient clipping. An objective only
says what the loss of a micro-batch is; the trainer turns micro-batches into optimizer steps:

    trainer.start()                                   # a fresh optimizer state, unless it is carried
    for step in steps:
        metrics = trainer.accumulate(micro_batches, loss_of)   # backward each; gradients sync on the last
        trainer.step()                                # clip, update, zero the gradients

`loss_of(micro_batch)` returns (loss, metrics) where the losses of all micro-batches of the step, on all
processes, sum to the step's loss; the metrics are partial sums in the same sense, so they add up across
micro-batches and processes too. Under N processes each one backpropagates its share, and the gradients
(averaged by the data-parallel wrapper) are scaled back to that sum: the step is the one-process step.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from raft.errors import RaftError
from raft.finetune import distributed
from raft.rundir import load_state

OPTIMIZER_FILE = "optimizer.pt"


@dataclass
class TrainerSettings:
    learning_rate: float
    weight_decay: float = 0.0
    max_grad_norm: float = 0.0  # 0: no clipping
    carry_optimizer_state: bool = False  # keep AdamW moments across iterations (and in checkpoints)
    mixed_precision: str = "no"  # no, bf16, fp16 (CUDA only) or auto (bf16 where native)
    warmup_steps: int = 0  # each iteration's first steps ramp the learning rate up linearly
    adam_epsilon: float = 1e-8  # torch's default

    @classmethod
    def from_finetune_config(cls, config) -> "TrainerSettings":
        """The settings a `finetune` section (raft.config.FinetuneConfig) gives the trainer."""
        return cls(config.learning_rate, config.weight_decay, config.max_grad_norm, config.carry_optimizer_state,
                   config.mixed_precision, config.warmup_steps, config.adam_epsilon)


class Trainer:
    """Trains `module` (every parameter that requires grad) with AdamW."""

    def __init__(self, module: torch.nn.Module, settings: TrainerSettings, checkpoint: Path | None = None,
                 device: torch.device | None = None):
        from accelerate import Accelerator

        device = device or next(module.parameters()).device
        if settings.mixed_precision == "auto":
            settings = replace(settings, mixed_precision="bf16" if distributed.has_fast_bf16(device) else "no")
        self.settings = settings
        if settings.mixed_precision == "fp16" and device.type != "cuda":
            raise RaftError("config: finetune.mixed_precision fp16 needs a CUDA device (bf16 runs on CPUs too)")
        distributed.state(cpu=device.type == "cpu")
        # device_placement off: the modality put the model on this process's device (distributed.resolve_device)
        options = dict(cpu=device.type == "cpu", mixed_precision=settings.mixed_precision, device_placement=False)
        try:
            self.accelerator = Accelerator(**options)
        except ValueError as error:  # accelerate keeps one precision per process; a later run here may want another
            if "already been initialized" not in str(error):
                raise
            from accelerate.state import AcceleratorState

            AcceleratorState._reset_state()  # the process group (PartialState) stays
            self.accelerator = Accelerator(**options)
        refuse_sharded_weights(self.accelerator)
        self.parameters = [p for p in module.parameters() if p.requires_grad]
        if not self.parameters:
            raise RaftError("finetune: the model has no trainable parameters")
        # torch's fused AdamW, where it has one: on CPUs the default one loops over the parameters, op by op (0.6-0.7 s
        # a step for SmolLM2-135M in float32 on 2 cores, against 0.08 s fused: a seventh of the fine-tuning's time)
        fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in self.parameters)
        optimizer = torch.optim.AdamW(self.parameters, lr=settings.learning_rate, weight_decay=settings.weight_decay,
                                      eps=settings.adam_epsilon, **({"fused": True} if fused else {}))
        state = checkpoint / OPTIMIZER_FILE if checkpoint is not None else None
        self.resumed = settings.carry_optimizer_state and state is not None and state.is_file()
        if self.resumed:
            optimizer.load_state_dict(load_state(state, map_location=device))
        self.model, self.optimizer = self.accelerator.prepare(module, optimizer)
        self.started = self.resumed  # whether the optimizer has state worth keeping
        self.steps_this_iteration = 0

    @property
    def num_processes(self) -> int:
        return self.accelerator.num_processes

    def unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def start(self) -> None:
        """Begin an iteration's fine-tuning: AdamW starts from zero moments unless they are carried."""
        if not self.settings.carry_optimizer_state:
            self.optimizer.optimizer.state.clear()  # what a new AdamW over the same parameters would hold
        self.started = True
        self.steps_this_iteration = 0

    def accumulate(self, micro_batches: Sequence[Any], loss_of: Callable[[Any], tuple[torch.Tensor, dict]],
                   padding: Any = None) -> dict[str, float]:
        """Backpropagates this process's micro-batches of one step; returns the step's metrics (summed over the
        micro-batches and the processes).

        Gradients are synchronised across processes on the last micro-batch only. A process with no micro-batch
        (a step smaller than the number of processes) backpropagates `padding` with weight 0, so that every
        process joins the synchronisation."""
        accelerator = self.accelerator
        work = [(batch, 1.0) for batch in micro_batches]
        if not work:
            if padding is None and self.num_processes > 1:
                raise ValueError("a process without micro-batches needs a padding micro-batch")
            work = [(padding, 0.0)] if self.num_processes > 1 else []
        totals: dict[str, float] = {}
        for index, (batch, weight) in enumerate(work):
            last = index == len(work) - 1
            accelerator.sync_gradients = last
            with contextlib.nullcontext() if last else accelerator.no_sync(self.model):
                loss, metrics = loss_of(batch)
                # the data-parallel wrapper averages the processes' gradients; the step's loss is their sum
                scale = weight * self.num_processes
                accelerator.backward(loss * scale if scale != 1.0 else loss)
            if weight:
                for key, value in metrics.items():
                    totals[key] = totals.get(key, 0.0) + value
        accelerator.sync_gradients = True
        return totals

    def reduce(self, metrics: dict[str, float], keys: Sequence[str] = ()) -> dict[str, float]:
        """`metrics` summed over the processes; `keys` that a process did not produce count as 0 there."""
        full = {key: metrics.get(key, 0.0) for key in dict.fromkeys([*keys, *metrics])}
        return distributed.reduce_sum(full)

    def step(self) -> None:
        """Clip the gradients (finetune.max_grad_norm), update, zero the gradients."""
        if self.settings.max_grad_norm > 0:
            self.accelerator.clip_grad_norm_(self.parameters, self.settings.max_grad_norm)
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate()
        self.optimizer.step()
        self.steps_this_iteration += 1
        self.optimizer.zero_grad(set_to_none=True)

    def learning_rate(self) -> float:
        """The learning rate of the next step: warming up linearly over the iteration's first warmup_steps."""
        warmup, step = self.settings.warmup_steps, self.steps_this_iteration
        return self.settings.learning_rate * (min(1.0, (step + 1) / (warmup + 1)) if warmup else 1.0)

    def save_optimizer(self, directory: Path) -> None:
        """Write the AdamW state when it is carried (call on the main process)."""
        if self.settings.carry_optimizer_state and self.started:
            torch.save(self.optimizer.state_dict(), directory / OPTIMIZER_FILE)

    def model_state(self) -> dict[str, torch.Tensor] | None:
        """The full state dict of a sharded module (FSDP, DeepSpeed ZeRO), gathered: collective, so every process
        must call it (the main process then saves it); None when each process holds the whole model (one
        process, DDP), whose own state_dict() is the one to save."""
        from accelerate.utils import DistributedType

        if self.accelerator.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            return None
        return self.accelerator.get_state_dict(self.model)


def refuse_sharded_weights(accelerator) -> None:
    """FSDP and DeepSpeed ZeRO-3 shard the weights over the processes; raft samples, ranks and evaluates with the
    whole model on each process, each on its own prompts, which sharded weights would deadlock. One line, before
    anything trains."""
    from accelerate.utils import DistributedType

    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    sharded = accelerator.distributed_type == DistributedType.FSDP or (
        accelerator.distributed_type == DistributedType.DEEPSPEED and plugin is not None and plugin.zero_stage == 3)
    if sharded:
        raise RaftError("finetune: FSDP and DeepSpeed ZeRO-3 shard the weights, but raft samples from whole weights on "
                        "each process (not supported yet); launch with configs/accelerate/deepspeed-zero2.yaml or "
                        "ddp.yaml")
