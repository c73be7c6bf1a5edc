"""raft/finetune/trainer.py on one process: the learning-rate warm-up of each iteration."""

from __future__ import annotations

import pytest
import torch

from raft.finetune.trainer import Trainer, TrainerSettings


def first_step_sizes(warmup_steps: int, steps: int = 4, iterations: int = 2) -> list[float]:
    """The largest weight change of each optimizer step, over `iterations` iterations of `steps` steps."""
    torch.manual_seed(0)
    module = torch.nn.Linear(4, 1)
    trainer = Trainer(module, TrainerSettings(learning_rate=0.1, warmup_steps=warmup_steps))
    inputs, targets = torch.randn(8, 4), torch.randn(8, 1)
    sizes = []
    for _ in range(iterations):
        trainer.start()
        for _ in range(steps):
            before = module.weight.detach().clone()
            trainer.accumulate([0], lambda _: (torch.nn.functional.mse_loss(trainer.model(inputs), targets), {}))
            trainer.step()
            sizes.append(float((module.weight.detach() - before).abs().max()))
    return sizes


def test_warmup_ramps_the_learning_rate_each_iteration():
    plain, warm = first_step_sizes(0), first_step_sizes(2)
    # a fresh AdamW moves each weight by about the learning rate at its first step, whatever the gradient
    assert plain[0] == pytest.approx(0.1, rel=1e-3)
    assert warm[0] == pytest.approx(0.1 / 3, rel=1e-3) and warm[1] < 0.1 * 0.7
    assert warm[4] == pytest.approx(0.1 / 3, rel=1e-3)  # the next iteration warms up again (a fresh optimizer)
    assert warm[3] == pytest.approx(plain[3], rel=0.5)  # past the warm-up: the full learning rate


def test_warmup_bound_is_declared():
    import raft
    from raft.errors import RaftError

    with pytest.raises(RaftError, match="finetune.warmup_steps"):
        raft.load_config("text", overrides=["finetune.warmup_steps=-1"])


@pytest.mark.parametrize("fast", [True, False])
def test_auto_precision_is_bf16_only_where_native(monkeypatch, fast):
    from raft.finetune import distributed

    monkeypatch.setattr(distributed, "has_fast_bf16", lambda device: fast)
    trainer = Trainer(torch.nn.Linear(4, 1), TrainerSettings(learning_rate=0.1, mixed_precision="auto"))
    assert trainer.settings.mixed_precision == ("bf16" if fast else "no")
    assert trainer.accelerator.mixed_precision == ("bf16" if fast else "no")
    out = trainer.model(torch.randn(2, 4))  # accelerate hands back float32, computed in bf16 under bf16
    assert torch.equal(out, out.bfloat16().float()) == fast


@pytest.mark.parametrize("adam_epsilon, expected", [(1e-8, 0.1), (1e-4, 0.1 * 1e-6 / (1e-6 + 1e-4))])
def test_adam_epsilon_damps_weights_with_tiny_gradients(adam_epsilon, expected):
    torch.manual_seed(0)
    module = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        module.weight.zero_()
    trainer = Trainer(module, TrainerSettings(learning_rate=0.1, adam_epsilon=adam_epsilon))
    # the loss is linear in the weights: gradient 1 for the first, 1e-6 for the second
    inputs = torch.tensor([[1.0, 1e-6]])
    trainer.start()
    trainer.accumulate([0], lambda _: (trainer.model(inputs).sum(), {}))
    trainer.step()
    big, tiny = (-module.weight.detach()[0]).tolist()
    assert big == pytest.approx(0.1, rel=1e-3)  # a gradient far above either eps: a step of the learning rate
    assert tiny == pytest.approx(expected, rel=1e-2)  # at eps 1e-8 a gradient of 1e-6 moves as far as one of 1


def test_adam_epsilon_bound_is_declared():
    import raft
    from raft.errors import RaftError

    with pytest.raises(RaftError, match="finetune.adam_epsilon"):
        raft.load_config("diffusion", overrides=["finetune.adam_epsilon=0"])
