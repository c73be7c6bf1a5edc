"""Diffusion modality: diffusers text-to-image pipelines (Stable Diffusion-style) aligned with image rewards.

Each sample is one image, drawn from its own recorded seed; the kept images train a LoRA adapter on the
UNet (or the whole UNet) with the standard denoising loss. Every iteration folder holds the images as PNG
files (`images/`) and `eval_grid.png`, the held-out prompts' images from the same seeds every iteration.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from raft.errors import RaftError
from raft.interface import Components, Modality
from raft.modalities.diffusion.config import DiffusionRaftConfig


class DiffusionModality(Modality):
    name = "diffusion"
    config_class = DiffusionRaftConfig

    def build(self, config: DiffusionRaftConfig, checkpoint: Path | None) -> Components:
        # imported here: `raft run --help` and config loading need no diffusers
        if importlib.util.find_spec("diffusers") is None:
            raise RaftError("the diffusion modality needs diffusers (pip install 'raft-align[diffusion]')")
        from raft.modalities.diffusion.clip import load_clip
        from raft.modalities.diffusion.data import load_prompts
        from raft.modalities.diffusion.evaluate import GRID_FILE, DiffusionEvaluator, write_grid
        from raft.modalities.diffusion.finetune import DiffusionFineTuner
        from raft.modalities.diffusion.generators import build_external_generators, build_generator
        from raft.modalities.diffusion.model import load_policy, load_start_unet
        from raft.modalities.diffusion.rankers import build_ranker, clip_model_of, processor_of
        from raft.finetune.distributed import resolve_device
        from raft.rankers import with_aggregation, with_timeout
        from raft.modalities.diffusion.sampler import DiffusionSampler

        data = load_prompts(config.data)  # first: bad data fails before a model is loaded
        external = build_external_generators(config)  # files: also before the pipeline loads
        device = resolve_device(config.model.device)
        ranker = with_timeout(with_aggregation(build_ranker(config.rankers, device), config.ranker_aggregation),
                              config.ranker_timeout_s)
        policy = load_policy(config.model, config.finetune.lora, checkpoint, seed=config.seed)
        sampler = DiffusionSampler(policy, config.generation)
        anchored_unet = config.finetune.anchor > 0 and not config.finetune.lora.enabled
        start_unet = load_start_unet(config.model, policy.device) if anchored_unet else None

        embedding_model = config.eval.embedding_model
        if embedding_model is None:
            # rankers whose model is a CLIP that load_clip reads (HPSv2's checkpoint and ImageReward's BLIP are not)
            clip_rankers = [r for r in config.rankers if r.kind in ("clip", "aesthetic", "pickscore", "laion-aesthetic-v2")]
            embedding_model = clip_model_of(clip_rankers[0]) if clip_rankers else "pixels"
            processor = processor_of(clip_rankers[0]) if clip_rankers else None
        else:
            processor = None
        embedder = None if embedding_model == "pixels" else load_clip(embedding_model, processor, str(device),
                                                                       "float32", "eval.embedding_model")

        evaluator = DiffusionEvaluator(embedder)
        pixels = DiffusionEvaluator(None)
        diversity = config.selection.diversity.features  # CLIP image embeddings (auto, clip) or raw pixels

        def features(samples: list) -> Any:
            images = [s.output for s in samples]
            return (pixels if diversity == "pixels" else evaluator).embed(images).numpy()

        def write_files(folder: Path, files: dict) -> None:
            if config.eval.grid_prompts and files.get("eval_samples"):
                write_grid(folder / GRID_FILE, files["eval_samples"], config.eval.grid_prompts)

        return Components(
            prompts=data.prompts,
            eval_prompts=data.eval_prompts,
            generator=build_generator(config, external, policy),
            policy=sampler,
            ranker=ranker,
            finetuner=DiffusionFineTuner(policy, config.finetune, checkpoint,
                                         resolution=config.generation.resolution, start_unet=start_unet),
            evaluator=evaluator,
            features=features,
            eval_samples_per_prompt=config.eval.samples_per_prompt,
            eval_seed=config.eval.seed,
            output_to_record=save_image,
            record_to_output=load_image,
            write_files=write_files,
        )


def save_image(output: Any, folder: Path, key: str) -> Any:
    """A PIL image becomes images/<key>.png in the iteration folder; the record holds that relative path."""
    if not hasattr(output, "save"):
        return output
    (folder / "images").mkdir(exist_ok=True)
    output.save(folder / "images" / f"{key}.png")
    return f"images/{key}.png"


def load_image(record: Any, folder: Path) -> Any:
    """save_image's record (a path relative to the iteration folder) back into the RGB image it saved (PNG: the same
    pixels)."""
    from PIL import Image

    path = folder / record
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as error:
        raise RaftError(f"cannot read the kept image '{path}' back ({error})") from None
