"""Images/s of raft's in-loop diffusion sampling against a direct diffusers pipeline call with the same settings.

    .venv/bin/python benchmarks/diffusion_sampling_speed.py [--prompts 8] [--k 8] [--rounds 2]

raft's side is what the loop runs: the modality's policy sampler (the pipeline with its LoRA adapter attached,
one recorded seed per image, `generation.batch_size` images per call). The direct side loads the same pipeline
with `DiffusionPipeline.from_pretrained`, swaps in the same scheduler and calls it on the same prompts, with one
`torch.Generator(seed)` per image and the same batches. Both must draw the same images: the largest pixel
difference is printed, and the script fails if it is above `--max-pixel-diff`. Prints the ratio raft/direct
(1.0: as fast; the target is >= 0.9).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch


def direct_pipeline(config):
    """The base pipeline as a diffusers user would load it, with raft's sampling scheduler."""
    from diffusers import DiffusionPipeline

    from raft.modalities.diffusion.model import dtype_argument, resolve_source, scheduler_class

    pipeline = DiffusionPipeline.from_pretrained(resolve_source(config.model.name_or_path), safety_checker=None,
                                                 requires_safety_checker=False,
                                                 **dtype_argument(getattr(torch, config.model.dtype)))
    if config.model.scheduler != "default":
        pipeline.scheduler = scheduler_class(config.model.scheduler).from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@torch.no_grad()
def direct_sample(pipeline, jobs, settings, batch_size):
    images = []
    for start in range(0, len(jobs), batch_size):
        batch = jobs[start : start + batch_size]
        size = settings["resolution"]
        images += pipeline(
            prompt=[p for p, _ in batch], negative_prompt=[settings["negative_prompt"]] * len(batch), height=size,
            width=size, num_inference_steps=settings["num_inference_steps"], guidance_scale=settings["guidance_scale"],
            eta=settings["eta"], generator=[torch.Generator("cpu").manual_seed(s) for _, s in batch]).images
    return images


def max_pixel_diff(a, b) -> int:
    return max(int(np.abs(np.asarray(x, np.int16) - np.asarray(y, np.int16)).max()) for x, y in zip(a, b))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2, help="timings per side, interleaved so load drift hits both")
    parser.add_argument("--max-pixel-diff", type=int, default=1, help="fail above this (0-255 scale)")
    parser.add_argument("overrides", nargs="*", help="config overrides, as for raft run (key=value)")
    args = parser.parse_args(argv)

    import raft
    from raft.modalities import get_modality
    from raft.modalities.diffusion.sampler import settings_of

    config = raft.load_config("diffusion", None, args.overrides)
    parts = get_modality("diffusion").build(config, checkpoint=None)  # the loop's own sampler, LoRA attached
    sampler = parts.policy
    sampler.progress = False  # no progress bars in the figures
    prompts = parts.prompts[: args.prompts]
    pipeline = direct_pipeline(config)
    reference = sampler.generate(prompts, args.k, seed=0)
    jobs = [(s.prompt, s.meta["seed"]) for s in reference]
    settings = settings_of(sampler.policy, config.generation)
    print(f"{len(jobs)} images ({len(prompts)} prompts x {args.k}), {settings}, torch threads "
          f"{torch.get_num_threads()}", flush=True)

    times = {"raft": 0.0, "direct": 0.0}
    for round_index in range(args.rounds):
        started = time.perf_counter()
        ours = [s.output for s in sampler.generate(prompts, args.k, seed=0)]
        times["raft"] += time.perf_counter() - started
        started = time.perf_counter()
        theirs = direct_sample(pipeline, jobs, settings, config.generation.batch_size)
        times["direct"] += time.perf_counter() - started
        print(f"round {round_index + 1}: raft {len(jobs) * (round_index + 1) / times['raft']:.1f} images/s, "
              f"direct {len(jobs) * (round_index + 1) / times['direct']:.1f} images/s", flush=True)
    diff = max_pixel_diff(ours, theirs)
    ratio = times["direct"] / times["raft"]
    print(f"max pixel difference raft vs direct: {diff} (of 255)")
    print(f"raft in-loop sampling: {ratio:.2f}x the direct pipeline's speed")
    if diff > args.max_pixel_diff:
        print(f"FAIL: images differ by up to {diff} > --max-pixel-diff {args.max_pixel_diff}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
