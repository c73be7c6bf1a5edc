"""Sampling K images per prompt from the pipeline, in batches, each image from its own recorded seed.

Image i of a batch starts from noise drawn by its own `torch.Generator(seed_i)` on the CPU, so an image
depends on its prompt, its seed, the settings and the weights, not on the batch it was drawn in:
`regenerate(policy, settings, [prompt], [seed])` reproduces it.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from raft.interface import META_GENERATOR, META_PROMPT_SENT, META_SEED, META_SETTINGS, POLICY_GENERATOR, Generator, Sample
from raft.modalities.diffusion.config import DiffusionGenerationConfig
from raft.modalities.diffusion.model import DiffusionPolicy


def image_seed(seed: int, prompt_position: int, sample: int) -> int:
    """The seed of sample `sample` of the prompt at `prompt_position` in a call seeded with `seed`."""
    return int(np.random.SeedSequence([seed, prompt_position, sample]).generate_state(1, np.uint64)[0] >> 1)


def settings_of(policy: DiffusionPolicy, config: DiffusionGenerationConfig) -> dict:
    """Everything besides prompt, seed and weights that decides an image; recorded with every sample."""
    return {
        "resolution": config.resolution or policy.default_resolution(),
        "num_inference_steps": config.num_inference_steps,
        "guidance_scale": config.guidance_scale,
        "eta": config.eta,
        "negative_prompt": config.negative_prompt,
        "scheduler": type(policy.pipeline.scheduler).__name__,
    }


@torch.no_grad()
def regenerate(policy: DiffusionPolicy, settings: dict, prompts: list[str], seeds: list[int]) -> list[Image.Image]:
    """The images of `prompts` drawn from `seeds` with `settings` (as recorded in a sample's meta)."""
    pipeline = policy.pipeline
    size = settings["resolution"]
    kwargs = {}
    if "eta" in _call_parameters(pipeline):
        kwargs["eta"] = settings["eta"]
    negative = [settings["negative_prompt"]] * len(prompts) if settings["guidance_scale"] > 1 else None
    with policy.autocast():
        result = pipeline(
            prompt=list(prompts), negative_prompt=negative, height=size, width=size,
            num_inference_steps=settings["num_inference_steps"], guidance_scale=settings["guidance_scale"],
            generator=[torch.Generator("cpu").manual_seed(int(s)) for s in seeds], output_type="pil", **kwargs)
    return list(result.images)


def _call_parameters(pipeline) -> set[str]:
    import inspect

    return set(inspect.signature(pipeline.__call__).parameters)


class DiffusionSampler(Generator):
    name = POLICY_GENERATOR

    def __init__(self, policy: DiffusionPolicy, config: DiffusionGenerationConfig, progress: bool = True):
        self.policy, self.config, self.progress = policy, config, progress

    def generate(self, prompts: list[str], samples_per_prompt: int, seed: int) -> list[Sample]:
        settings = settings_of(self.policy, self.config)
        jobs = [(i, prompt, image_seed(seed, i, k)) for i, prompt in enumerate(prompts) for k in range(samples_per_prompt)]
        images: list[Image.Image] = []
        size = self.config.batch_size
        batches = range(0, len(jobs), size)
        for start in tqdm(batches, desc=f"sampling {len(jobs)} images", disable=not self.progress, leave=False):
            batch = jobs[start : start + size]
            images += regenerate(self.policy, settings, [p for _, p, _ in batch], [s for _, _, s in batch])
        return [
            Sample(prompt_index=i, prompt=prompt, output=image,
                   meta={META_GENERATOR: self.name, META_PROMPT_SENT: prompt, META_SEED: image_seed_value,
                         META_SETTINGS: settings})
            for (i, prompt, image_seed_value), image in zip(jobs, images)
        ]
