"""Run by tests/test_distributed.py, alone or under torchrun: one Trainer step's gradient on a tiny linear
model, each process backpropagating its share of the rows (a process may have none), saved by the main one."""

import sys

import torch

from raft.finetune import distributed
from raft.finetune.trainer import Trainer, TrainerSettings

rows, out = int(sys.argv[1]), sys.argv[2]
torch.manual_seed(0)
model = torch.nn.Linear(3, 1)
inputs, targets = torch.randn(rows, 3), torch.randn(rows, 1)
trainer = Trainer(model, TrainerSettings(learning_rate=0.1), None, torch.device("cpu"))


def loss_of(chunk):
    index = torch.tensor(chunk)
    loss = ((trainer.model(inputs[index]) - targets[index]) ** 2).sum() / rows  # the step's loss: a mean over all rows
    return loss, {"loss": loss.item()}


mine = distributed.shard(list(range(rows)))
metrics = trainer.reduce(trainer.accumulate([[i] for i in mine], loss_of, padding=[0]), ["loss"])
if distributed.is_main():
    torch.save({"grads": [p.grad for p in model.parameters()], "loss": metrics["loss"],
                "processes": distributed.world(), "type": distributed.state().distributed_type.value}, out)
distributed.finish()
