"""Whole diffusion RAFT runs through the CLI on tiny models: the run directory's contents, exact resume after
SIGKILL, and the saved LoRA reproducing the aligned images in a fresh pipeline from their recorded seeds."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("diffusers")

from tiny_diffusion import TINY_SIZE, tiny_diffusion_overrides


def raft_run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "raft", "run", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


def records(run_dir, iteration, name):
    path = run_dir / "iterations" / f"iter-{iteration:04d}" / f"{name}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def outcome(run_dir):
    """What a run produced that must not depend on interruptions: metrics without timings, records, images."""
    metrics = [{k: v for k, v in json.loads(line).items() if not k.startswith("time/")}
               for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    images = {str(p.relative_to(run_dir)): np.asarray(Image.open(p)).tobytes()
              for p in sorted((run_dir / "iterations").rglob("*.png"))}
    texts = {str(p.relative_to(run_dir)): p.read_text() for p in sorted((run_dir / "iterations").rglob("*.jsonl"))}
    return metrics, texts, images


@pytest.fixture(scope="module")
def finished_run(tiny_sd_dir, tiny_clip_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("diffusion-run") / "run"
    result = raft_run(*tiny_diffusion_overrides(tiny_sd_dir, tiny_clip_dir, run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "held-out reward:" in result.stdout
    return run_dir


def test_run_directory_holds_images_seeds_grids_and_metrics(finished_run):
    run_dir = finished_run
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics] == [0, 1, 2]
    for key in ("eval/reward_mean", "eval/diversity", "eval/diversity_within_prompt"):
        assert all(np.isfinite(m[key]) for m in metrics), key
    for key in ("reward/policy_mean", "reward/selected_mean", "train/loss"):
        assert all(np.isfinite(m[key]) for m in metrics[1:]), key
    assert all(m["reward/selected_mean"] >= m["reward/policy_mean"] for m in metrics[1:])

    samples = records(run_dir, 1, "samples")
    assert len(samples) == 6 and sum(s["selected"] for s in samples) == 2
    for s in samples:
        assert isinstance(s["seed"], int) and s["settings"]["resolution"] == TINY_SIZE
        assert Image.open(run_dir / "iterations/iter-0001" / s["output"]).size == (TINY_SIZE, TINY_SIZE)
        assert -100 <= s["reward"] <= 100
    for iteration in (0, 1, 2):
        grid = Image.open(run_dir / "iterations" / f"iter-{iteration:04d}" / "eval_grid.png")
        assert grid.height >= 2 * 96  # two held-out prompts, one row each, enlarged
    assert (run_dir / "checkpoints/iter-0002/pytorch_lora_weights.safetensors").is_file()
    assert (run_dir / "metrics.png").is_file()


def test_saved_lora_reproduces_the_aligned_images_in_a_fresh_pipeline(finished_run, tiny_sd_dir):
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    run_dir = finished_run
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None)
    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    pipeline.load_lora_weights(str(run_dir / "checkpoints/iter-0002"))
    aligned = records(run_dir, 2, "eval_samples")  # the policy after the last fine-tuning, on held-out prompts
    for record in aligned:
        settings = record["settings"]
        image = pipeline(record["prompt"], height=settings["resolution"], width=settings["resolution"],
                         num_inference_steps=settings["num_inference_steps"], guidance_scale=settings["guidance_scale"],
                         generator=torch.Generator().manual_seed(record["seed"])).images[0]
        saved = np.asarray(Image.open(run_dir / "iterations/iter-0002" / record["output"]), dtype=np.int16)
        assert np.abs(np.asarray(image, dtype=np.int16) - saved).max() <= 1

    # and the adapter matters: it was trained (its up-projections start at zero), and the base pipeline draws
    # different images from the same seeds. How different depends on the random tiny model and the CPU's
    # threads (8 levels at most was seen in CI), so the images are only required to differ.
    from safetensors.torch import load_file

    adapter = load_file(run_dir / "checkpoints/iter-0002/pytorch_lora_weights.safetensors")
    up = [tensor for name, tensor in adapter.items() if "lora_B" in name or "lora.up" in name]
    assert up and all(tensor.abs().max() > 0 for tensor in up)
    base = records(run_dir, 0, "eval_samples")
    before = np.stack([np.asarray(Image.open(run_dir / "iterations/iter-0000" / r["output"]), dtype=np.int16) for r in base])
    after = np.stack([np.asarray(Image.open(run_dir / "iterations/iter-0002" / r["output"]), dtype=np.int16) for r in aligned])
    assert [r["seed"] for r in base] == [r["seed"] for r in aligned]
    assert np.abs(before - after).max() > 1  # beyond the 1-level tolerance of the reproduction above


@pytest.mark.parametrize("kill_at", ["2:finetune", "2:commit"])
def test_sigkill_then_resume_equals_uninterrupted(finished_run, tiny_sd_dir, tiny_clip_dir, tmp_path, kill_at):
    run_dir = tmp_path / "run"
    overrides = tiny_diffusion_overrides(tiny_sd_dir, tiny_clip_dir, run_dir)
    killed = raft_run(*overrides, env={"RAFT_KILL_AT": kill_at})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert json.loads((run_dir / "state.json").read_text())["completed_iteration"] == 1
    resumed = raft_run("--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout
    got, expected = outcome(run_dir), outcome(finished_run)
    assert got[0] == expected[0]
    assert got[1].keys() == expected[1].keys() and got[1] == expected[1]
    assert got[2].keys() == expected[2].keys() and got[2] == expected[2]
    assert not [p for p in run_dir.rglob("*") if ".tmp" in p.name]  # *.tmp, *.tmp.png (grids, metrics.png)


def test_bad_diffusion_settings_stop_before_anything_loads(tmp_path):
    result = raft_run("--modality", "diffusion", f"run_dir={tmp_path / 'r'}", "generation.resolution=30")
    assert result.returncode == 2
    assert result.stderr.strip() == "raft: error: config: generation.resolution must be a multiple of 8 (or null)"
    result = raft_run("--modality", "diffusion", f"run_dir={tmp_path / 'r'}", "rankers.0.kind=aesthetic",
                      "rankers.0.head=linear")
    assert result.returncode == 2 and "rankers.0.weights is required by the linear aesthetic head" in result.stderr


def test_a_config_file_names_its_modality():
    from pathlib import Path

    config = Path(__file__).parent.parent / "configs" / "diffusion-sd15-aesthetic.yaml"
    result = subprocess.run([sys.executable, "-m", "raft", "config", "--config", str(config)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "modality: diffusion" in result.stdout and "resolution: 256" in result.stdout


def test_kept_image_replay_resumes_exactly(tiny_sd_dir, tiny_clip_dir, tmp_path):
    """selection.replay_iterations reads the earlier kept images back from their PNG files: the fine-tuning set
    grows each iteration, and a run killed while fine-tuning on it resumes to the uninterrupted run's result."""
    runs = {}
    for name, env in (("uninterrupted", None), ("killed", {"RAFT_KILL_AT": "3:finetune"})):
        run_dir = tmp_path / name
        overrides = [*tiny_diffusion_overrides(tiny_sd_dir, tiny_clip_dir, run_dir), "iterations=3",
                     "selection.replay_iterations=-1"]
        result = raft_run(*overrides, env=env)
        if env:
            assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
            result = raft_run("--resume", str(run_dir))
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = run_dir
    metrics = [json.loads(line) for line in (runs["uninterrupted"] / "metrics.jsonl").read_text().splitlines()]
    kept = [m.get("selected") for m in metrics]
    assert [m.get("selection/replayed") for m in metrics] == [None, 0, kept[1], kept[1] + kept[2]]
    # every kept image is trained on: the steps per iteration follow the growing set (tiny overrides: 2 epochs of
    # batches of 2)
    epochs, batch = 2, 2
    assert [m["train/steps"] for m in metrics[1:]] == [epochs * -(-sum(kept[1:i + 1]) // batch) for i in (1, 2, 3)]
    got, expected = outcome(runs["killed"]), outcome(runs["uninterrupted"])
    assert got[0] == expected[0] and got[1] == expected[1] and got[2] == expected[2]


def test_a_kept_image_that_cannot_be_read_back_is_one_line(tmp_path):
    from raft.errors import RaftError
    from raft.modalities.diffusion import load_image, save_image

    record = save_image(Image.new("RGB", (4, 4), (200, 10, 30)), tmp_path, "selected-00000")
    assert np.array_equal(np.asarray(load_image(record, tmp_path)), np.full((4, 4, 3), (200, 10, 30), np.uint8))
    (tmp_path / record).write_bytes(b"not a png")  # a truncated or replaced file
    with pytest.raises(RaftError, match="cannot read the kept image .*selected-00000.png"):
        load_image(record, tmp_path)
