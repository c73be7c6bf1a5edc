"""Modality registry. A new modality is a new folder (or package) with a `Modality` subclass: built-in ones
are listed here, third-party ones register under the `raft.modalities` entry-point group."""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from raft.errors import RaftError
from raft.interface import Modality

BUILTIN = {
    "text": "raft.modalities.text:TextModality",
    "diffusion": "raft.modalities.diffusion:DiffusionModality",
}


def available() -> list[str]:
    return sorted(set(BUILTIN) | {e.name for e in entry_points(group="raft.modalities")})


def get_modality(name: str) -> Modality:
    target = BUILTIN.get(name)
    if target is None:
        found = [e for e in entry_points(group="raft.modalities") if e.name == name]
        if not found:
            raise RaftError(f"unknown modality '{name}' (available: {', '.join(available())})")
        return found[0].load()()
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)()
