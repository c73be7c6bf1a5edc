"""Held-out image metrics (diversity) and the per-iteration image grid of the held-out prompts.

Diversity is the mean pairwise cosine distance (1 - cos) between image embeddings: over all held-out images
(`eval/diversity`), and among the images of each prompt, averaged over prompts (`eval/diversity_within_prompt`,
the one that falls when a reward collapses every prompt onto one picture). Embeddings come from a CLIP model,
or are the raw pixels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from raft.interface import Evaluator, Sample
from raft.metrics import mean
from raft.modalities.diffusion.clip import ClipEmbedder

GRID_FILE = "eval_grid.png"


def pixel_embeddings(images: list[Image.Image], size: int = 64) -> torch.Tensor:
    arrays = [np.asarray(im.convert("RGB").resize((size, size), resample=3), dtype=np.float32) / 255 for im in images]
    return F.normalize(torch.from_numpy(np.stack(arrays)).flatten(1) - 0.5, dim=-1)


def mean_pairwise_distance(embeddings: torch.Tensor) -> float:
    """Mean of 1 - cos over all unordered pairs of rows (rows are unit vectors); nan for fewer than 2."""
    count = len(embeddings)
    if count < 2:
        return float("nan")
    similarity = embeddings @ embeddings.T
    off_diagonal = similarity.sum() - similarity.diagonal().sum()
    return float(1.0 - off_diagonal / (count * (count - 1)))


class DiffusionEvaluator(Evaluator):
    def __init__(self, embedder: ClipEmbedder | None, batch_size: int = 32):
        self.embedder, self.batch_size = embedder, batch_size  # None: pixels

    def embed(self, images: list[Image.Image]) -> torch.Tensor:
        if self.embedder is None:
            return pixel_embeddings(images)
        return self.embedder.embed_images(images, self.batch_size)

    def evaluate(self, eval_samples: list[Sample], iteration: int = 0, last: bool = True) -> dict[str, float]:
        if not eval_samples:
            return {}
        embeddings = self.embed([s.output for s in eval_samples])
        by_prompt: dict[int, list[int]] = {}
        for i, sample in enumerate(eval_samples):
            by_prompt.setdefault(sample.prompt_index, []).append(i)
        within = [mean_pairwise_distance(embeddings[rows]) for rows in by_prompt.values() if len(rows) > 1]
        return {"eval/diversity": mean_pairwise_distance(embeddings), "eval/diversity_within_prompt": mean(within)}


def write_grid(path: Path, samples: list[Sample], max_prompts: int, min_cell: int = 96) -> None:
    """One row per prompt (its first `max_prompts`), one column per sample, the prompt written on the left.

    Small images are enlarged without smoothing, so 32-pixel images stay legible."""
    rows: dict[int, list[Sample]] = {}
    for sample in samples:
        if sample.prompt_index in rows or len(rows) < max_prompts:
            rows.setdefault(sample.prompt_index, []).append(sample)
    if not rows:
        return
    width, height = next(iter(rows.values()))[0].output.size
    scale = max(1, -(-min_cell // max(width, height)))  # ceil
    cell_w, cell_h = width * scale, height * scale
    columns = max(len(r) for r in rows.values())
    label_width = 8 + 6 * max(len(r[0].prompt) for r in rows.values())
    label_width = min(label_width, 420)
    grid = Image.new("RGB", (label_width + columns * (cell_w + 2), len(rows) * (cell_h + 2)), (255, 255, 255))
    pen = ImageDraw.Draw(grid)
    for r, row in enumerate(rows.values()):
        top = r * (cell_h + 2)
        pen.text((4, top + cell_h // 2 - 5), _shorten(row[0].prompt, (label_width - 8) // 6), fill=(0, 0, 0))
        for c, sample in enumerate(row):
            image = sample.output.convert("RGB")
            if scale > 1:
                image = image.resize((cell_w, cell_h), resample=Image.Resampling.NEAREST)
            grid.paste(image, (label_width + c * (cell_w + 2), top))
    from raft.rundir import temp_path

    tmp = temp_path(path, ".png")
    try:
        grid.save(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def _shorten(text: str, characters: int) -> str:
    return text if len(text) <= characters else text[: max(1, characters - 3)] + "..."
