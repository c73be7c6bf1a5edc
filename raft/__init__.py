"""raft: reward-ranked fine-tuning (RAFT) of generative models across modalities.

    import raft
    config = raft.load_config("text", overrides=["iterations=2"])
    run_dir = raft.run(config)
"""

from __future__ import annotations

from pathlib import Path

from raft.config import RaftConfig
from raft.errors import ConfigError, RaftError
from raft.interface import Components, Evaluator, FineTuner, Generator, Modality, Ranker, Sample
from raft.loop import run
from raft.modalities import get_modality

__version__ = "0.1.0"


def load_config(modality: str = "text", path: str | Path | None = None, overrides: list[str] = ()) -> RaftConfig:
    """The config of `modality`: its defaults, then the YAML file at `path`, then `key.sub=value` overrides."""
    from raft.config import load_config as _load

    return _load(get_modality(modality).config_class, path, [f"modality={modality}", *overrides])


__all__ = ["run", "load_config", "RaftConfig", "RaftError", "ConfigError", "Sample", "Generator", "Ranker",
           "FineTuner", "Evaluator", "Components", "Modality", "get_modality"]
