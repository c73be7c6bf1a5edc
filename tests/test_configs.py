from pathlib import Path

import pytest
import yaml

import raft
from raft.modalities.text.rankers import build_ranker

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load_and_validate(path):
    modality = (yaml.safe_load(path.read_text()) or {}).get("modality", "text")  # each file with its own modality
    config = raft.load_config(modality, path)
    assert config.modality == modality
    assert config.rankers


def test_ensemble_config_builds_its_rankers(monkeypatch):
    monkeypatch.chdir(Path(__file__).parent.parent)
    import torch

    config = raft.load_config("text", "configs/text-ensemble.yaml")
    ranker = build_ranker(config.rankers, torch.device("cpu"))
    assert [r.name for r, _ in ranker.parts] == ["vader", "brevity"]
