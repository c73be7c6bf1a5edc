"""The shipped offline diffusion models (raft/modalities/diffusion/assets, from scripts/train_offline_diffusion.py):
the CLIP judges composition, the pipeline follows prompts, and the offline default runs through the CLI."""

import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("diffusers")

from raft.modalities.diffusion import world
from raft.modalities.diffusion.model import ASSETS

pytestmark = pytest.mark.skipif(not (ASSETS / "shapes-sd").is_dir(), reason="offline diffusion assets not built")


def test_assets_are_small_safetensors_files():
    files = [p for p in ASSETS.rglob("*") if p.is_file()]
    weights = [p for p in files if p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt")]
    assert weights and all(p.suffix == ".safetensors" for p in weights)
    assert all(p.stat().st_size < 8_000_000 for p in files)
    assert sum(p.stat().st_size for p in files) < 20_000_000


def test_shipped_clip_prefers_the_true_caption_over_hard_negatives():
    from raft.modalities.diffusion.clip import load_clip

    clip = load_clip("builtin:shapes-clip")
    rng = np.random.default_rng(12345)
    scenes = [world.random_scene(rng, pair_share=1.0) for _ in range(64)]
    images = clip.embed_images([world.draw(s, rng) for s in scenes])
    wins = total = 0
    for scene, embedding in zip(scenes, images):
        texts = clip.embed_texts([scene.caption] + world.hard_negatives(scene, rng))
        scores = texts @ embedding
        wins += int((scores[1:] < scores[0]).sum())
        total += len(scores) - 1
    assert wins / total > 0.8


def test_shipped_pipeline_follows_its_prompts():
    """Images score higher against their own prompt than against another prompt's (CLIP score)."""
    import torch

    from raft.modalities.diffusion.clip import load_clip
    from raft.modalities.diffusion.config import DiffusionGenerationConfig, DiffusionLoraConfig, DiffusionModelConfig
    from raft.modalities.diffusion.model import load_policy
    from raft.modalities.diffusion.sampler import DiffusionSampler

    policy = load_policy(DiffusionModelConfig(device="cpu"), DiffusionLoraConfig(), None)
    _, prompts = world.alignment_prompts(eval_size=12)
    samples = DiffusionSampler(policy, DiffusionGenerationConfig(num_inference_steps=10), progress=False).generate(
        prompts, 2, seed=0)
    clip = load_clip("builtin:shapes-clip")
    images = clip.embed_images([s.output for s in samples])
    texts = clip.embed_texts(prompts)
    own = torch.stack([images[i] @ texts[s.prompt_index] for i, s in enumerate(samples)])
    other = torch.stack([images[i] @ texts[(s.prompt_index + 1) % len(prompts)] for i, s in enumerate(samples)])
    assert samples[0].output.size == (32, 32)
    assert (own - other).mean() > 0.02


@pytest.mark.slow
def test_offline_default_in_small_form(tmp_path):
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "raft", "run", "--modality", "diffusion", f"run_dir={run_dir}", "iterations=1",
         "prompts_per_iteration=4", "samples_per_prompt=4", "data.eval_size=4", "eval.samples_per_prompt=2"],
        capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "held-out reward:" in result.stdout
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics] == [0, 1]
    assert metrics[1]["reward/selected_mean"] > metrics[1]["reward/policy_mean"]
    samples = [json.loads(line) for line in (run_dir / "iterations/iter-0001/samples.jsonl").read_text().splitlines()]
    assert len(samples) == 16 and sum(s["selected"] for s in samples) == 4
    assert all(world.parse(s["prompt"]).relation for s in samples)  # two-object captions of the shapes world
    assert (run_dir / "iterations/iter-0000/eval_grid.png").is_file()
    assert (run_dir / "iterations/iter-0001/eval_grid.png").is_file()


@pytest.mark.slow
def test_training_script_reproduces_the_assets_in_small_form(tmp_path):
    """scripts/train_offline_diffusion.py, every stage at a tiny step count: it writes a pipeline raft loads, a CLIP
    model, and training.json with the settings (the shipped pair share among them)."""
    from pathlib import Path

    from raft.modalities.diffusion.config import DiffusionLoraConfig, DiffusionModelConfig
    from raft.modalities.diffusion.model import load_policy

    script = Path(__file__).resolve().parent.parent / "scripts" / "train_offline_diffusion.py"
    out, work = tmp_path / "assets", tmp_path / "work"
    result = subprocess.run([sys.executable, str(script), "--steps-scale", "0.003", "--out", str(out),
                             "--work-dir", str(work)], capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "training.json").read_text())
    assert summary["settings"]["pair_share"] == 0.15
    assert summary["figures"]["denoiser"]["pair_share"] == 0.15
    assert set(summary["figures"]["base_model_held_out"]) == {"guidance_1", "guidance_3", "guidance_5"}
    policy = load_policy(DiffusionModelConfig(name_or_path=str(out / "shapes-sd"), device="cpu"), DiffusionLoraConfig(), None)
    assert policy.default_resolution() == 32
    assert (out / "shapes-clip" / "model.safetensors").is_file()

    # a stage cache trained with another pair share is refused, not silently reused
    other = subprocess.run([sys.executable, str(script), "--steps-scale", "0.003", "--out", str(out), "--work-dir",
                            str(work), "--stages", "denoiser", "--pair-share", "0.5"], capture_output=True, text=True,
                           timeout=600)
    assert other.returncode != 0
    assert "--pair-share 0.5" in other.stderr and "trained with 0.15" in other.stderr
