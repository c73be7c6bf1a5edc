"""Diffusion modality (text-to-image pipelines from diffusers): not built yet, see the project's issue 3."""

from __future__ import annotations

from pathlib import Path

from raft.config import RaftConfig
from raft.errors import RaftError
from raft.interface import Components, Modality


class DiffusionModality(Modality):
    name = "diffusion"
    config_class = RaftConfig

    def build(self, config: RaftConfig, checkpoint: Path | None) -> Components:
        raise RaftError("the diffusion modality is not implemented yet; use --modality text")
