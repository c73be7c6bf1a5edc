"""PPO, the baseline RAFT is measured against (RLHF as in Ziegler et al. 2019 / Ouyang et al. 2022).

It has no loop of its own: `raft ppo` is the RAFT loop (raft/loop.py) with `finetune.objective=ppo` and the
settings PPO needs (TextPPOConfig, PPO_FIXED): the same sampler, rewards, held-out evaluation, run directory,
kill points and resume. The objective is raft/modalities/text/ppo.py; its losses raft/finetune/losses.py.

    raft ppo --config configs/text-imdb-lora.yaml ppo.learning_rate=1e-5
"""

from __future__ import annotations

from pathlib import Path

from raft.modalities.text.config import PPO_FIXED, PPOSettings, TextPPOConfig  # noqa: F401 (the PPO method's config)


def run_ppo(config: TextPPOConfig, resume: bool = False) -> Path:
    """Run (or, with `resume`, continue) PPO as `config` describes; returns the run directory."""
    from raft.loop import run

    config.finetune.objective = "ppo"
    config.validate()  # sets PPO_FIXED and checks the generators
    return run(config, resume=resume)
