"""Decoupled generation in the diffusion modality: a magic prompt reaches the pipeline but not fine-tuning or
the rankers, and a run whose only generator is a file of images fine-tunes the policy on them."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("diffusers")

from tiny_diffusion import TINY_SIZE, tiny_diffusion_overrides

MAGIC = "{prompt}, on black"


def raft_run(*args):
    return subprocess.run([sys.executable, "-m", "raft", "run", *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)


def records(run_dir, iteration, name):
    path = run_dir / "iterations" / f"iter-{iteration:04d}" / f"{name}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_magic_prompt_is_sent_to_the_pipeline_but_not_trained_on(tiny_sd_dir, tiny_clip_dir, tmp_path, monkeypatch):
    import raft
    from raft.modalities.diffusion import sampler
    from raft.modalities.diffusion.finetune import DiffusionFineTuner

    args = tiny_diffusion_overrides(tiny_sd_dir, tiny_clip_dir, tmp_path / "run")[2:]  # drop --modality diffusion
    config = raft.load_config("diffusion", overrides=args + [f"generators.0.sampling_template={MAGIC}", "iterations=1"])

    sent, trained = [], []
    original_regenerate = sampler.regenerate
    monkeypatch.setattr(sampler, "regenerate", lambda policy, settings, prompts, seeds:
                        sent.extend(prompts) or original_regenerate(policy, settings, prompts, seeds))
    original_finetune = DiffusionFineTuner.finetune
    monkeypatch.setattr(DiffusionFineTuner, "finetune",
                        lambda self, selected, seed: trained.extend(s.prompt for s in selected)
                        or original_finetune(self, selected, seed))
    run_dir = raft.run(config)

    samples = records(run_dir, 1, "samples")
    assert samples and all(s["prompt_sent"] == MAGIC.replace("{prompt}", s["prompt"]) for s in samples)
    assert all(", on black" not in s["prompt"] for s in samples)
    assert trained and all(", on black" not in p for p in trained)
    assert sorted(set(trained)) == sorted({s["prompt"] for s in records(run_dir, 1, "selected")})
    # the pipeline's text encoder saw the magic prompt (sampling) and the plain one (held-out evaluation)
    assert any(p.endswith(", on black") for p in sent)
    assert all(", on black" not in r["prompt_sent"] for r in records(run_dir, 1, "eval_samples"))


def test_a_file_of_images_alone_fine_tunes_the_policy(tiny_sd_dir, tiny_clip_dir, tmp_path):
    from raft.modalities.diffusion import world

    # the external "sampler": the shapes world itself draws 3 images for each of 3 captions
    captions = ["a red circle above a blue square", "a green triangle to the left of a white circle",
                "a yellow square below a purple triangle"]
    rng = np.random.default_rng(0)
    (tmp_path / "external").mkdir()
    rows = []
    for i, caption in enumerate(captions):
        for k in range(3):
            name = f"external/{i}-{k}.png"
            world.draw(world.parse(caption), rng, size=TINY_SIZE).save(tmp_path / name)
            rows.append({"prompt": caption, "image": name})
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "prompts.txt").write_text("\n".join(captions) + "\n")
    (tmp_path / "eval.txt").write_text("a blue circle above a red triangle\na white square to the right of a green circle\n")

    run_dir = tmp_path / "run"
    overrides = tiny_diffusion_overrides(tiny_sd_dir, tiny_clip_dir, run_dir) + [
        f"data.prompts={tmp_path / 'prompts.txt'}", f"data.eval_prompts={tmp_path / 'eval.txt'}", "iterations=1",
        "prompts_per_iteration=3", "samples_per_prompt=3",
        f"generators=[{{kind: file, name: world, path: {tmp_path / 'samples.jsonl'}, image_field: image}}]"]
    result = raft_run(*overrides)
    assert result.returncode == 0, result.stderr[-3000:]

    samples = records(run_dir, 1, "samples")
    assert len(samples) == 9 and {s["generator"] for s in samples} == {"world"}
    assert sum(s["selected"] for s in samples) == 3  # the best image of each prompt
    for s in samples:  # the run directory keeps its own copy of every external image, as it was ranked
        saved = np.asarray(Image.open(run_dir / "iterations/iter-0001" / s["output"]))
        assert np.array_equal(saved, np.asarray(Image.open(s["settings"]["image"]).convert("RGB")))
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert np.isfinite(metrics[1]["train/loss"]) and metrics[1]["train/steps"] > 0
    assert metrics[1].get("reward/policy_mean") is None  # the policy drew no training sample
    # the policy changed: the adapter's up-projections start at zero and were trained, so the held-out images
    # from the same seeds differ after fine-tuning on the file's images
    from safetensors.torch import load_file

    adapter = load_file(run_dir / "checkpoints/iter-0001/pytorch_lora_weights.safetensors")
    up = [tensor for name, tensor in adapter.items() if "lora_B" in name or "lora.up" in name]
    assert up and max(float(t.abs().max()) for t in up) > 0
    before = [np.asarray(Image.open(run_dir / "iterations/iter-0000" / r["output"]), dtype=np.int16)
              for r in records(run_dir, 0, "eval_samples")]
    after = [np.asarray(Image.open(run_dir / "iterations/iter-0001" / r["output"]), dtype=np.int16)
             for r in records(run_dir, 1, "eval_samples")]
    assert np.abs(np.stack(before) - np.stack(after)).max() > 0


def test_a_missing_image_is_named_in_one_line(tiny_sd_dir, tiny_clip_dir, tmp_path):
    (tmp_path / "samples.jsonl").write_text(json.dumps({"prompt": "a red circle", "image": "gone.png"}) + "\n")
    (tmp_path / "prompts.txt").write_text("a red circle\n")
    (tmp_path / "eval.txt").write_text("a blue square\n")
    overrides = tiny_diffusion_overrides(tiny_sd_dir, tiny_clip_dir, tmp_path / "run") + [
        f"data.prompts={tmp_path / 'prompts.txt'}", f"data.eval_prompts={tmp_path / 'eval.txt'}", "iterations=1",
        "prompts_per_iteration=1", "samples_per_prompt=1",
        f"generators=[{{kind: file, path: {tmp_path / 'samples.jsonl'}, image_field: image}}]"]
    result = raft_run(*overrides)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("raft: error: generators.0.path: cannot read the image")
    assert "gone.png" in result.stderr


def test_sampling_guidance_applies_to_training_images_only(tiny_sd_dir, tiny_clip_dir, tmp_path):
    import raft
    from raft.modalities import get_modality

    args = tiny_diffusion_overrides(tiny_sd_dir, tiny_clip_dir, tmp_path / "run")[2:]  # drop --modality diffusion
    config = raft.load_config("diffusion", overrides=args + ["generators.0.sampling_guidance_scale=1.0"])
    parts = get_modality("diffusion").build(config, checkpoint=None)
    trained_on = parts.generator.generate(["a red circle above a blue square"], 1, seed=0)
    evaluated = parts.policy.generate(["a red circle above a blue square"], 1, seed=0)
    assert trained_on[0].meta["settings"]["guidance_scale"] == 1.0
    assert evaluated[0].meta["settings"]["guidance_scale"] == config.generation.guidance_scale == 3.0


def test_sampling_guidance_is_checked():
    import raft
    from raft.errors import ConfigError

    with pytest.raises(ConfigError, match="generators.0.sampling_guidance_scale"):
        raft.load_config("diffusion", overrides=["generators.0.sampling_guidance_scale=-1"])
    with pytest.raises(ConfigError, match="sampling_guidance_scale do not apply to kind file"):
        raft.load_config("diffusion", overrides=["generators.0.kind=file", "generators.0.path=x.jsonl",
                                                 "generators.0.sampling_guidance_scale=1"])
