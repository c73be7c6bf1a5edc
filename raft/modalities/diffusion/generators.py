"""The diffusion modality's training generator, built from `config.generators`: the policy (with its magic
prompt and sampling-only negative prompt) and files of pre-generated images, mixed by share."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from PIL import Image

from raft.errors import RaftError
from raft.generators import FileSampler
from raft.generators.mixture import assemble
from raft.generators.prompts import apply_template
from raft.interface import Generator, Sample
from raft.modalities.diffusion.config import DiffusionRaftConfig
from raft.modalities.diffusion.model import DiffusionPolicy
from raft.modalities.diffusion.sampler import DiffusionSampler


class ImageFileSampler(Generator):
    """Pre-generated images: a table of (prompt, image path) rows; relative paths are read from the table's
    folder, so a previous run's iteration folder (samples.jsonl + images/) works as it is."""

    def __init__(self, table: FileSampler, folder: Path):
        self.table, self.folder, self.name = table, folder, table.name

    @property
    def prompts(self) -> list[str]:
        return self.table.prompts

    def generate(self, prompts: list[str], samples_per_prompt: int, seed: int) -> list[Sample]:
        samples = self.table.generate(prompts, samples_per_prompt, seed)
        for sample in samples:
            path = Path(sample.output).expanduser()
            path = path if path.is_absolute() else self.folder / path
            try:
                with Image.open(path) as image:
                    sample.output = image.convert("RGB")
            except (OSError, ValueError) as error:
                raise RaftError(f"{self.table.what}: cannot read the image '{path}' "
                                f"(row {sample.meta['settings']['row']}): {error}") from None
            sample.meta["settings"]["image"] = str(path)
        return samples


def build_external_generators(config: DiffusionRaftConfig) -> dict[int, Generator]:
    """The file generators, by position in the list; built before the pipeline loads, so bad files fail fast."""
    built = {}
    for index, entry in enumerate(config.generators):
        if entry.kind == "file":
            table = FileSampler(entry.path, entry.prompt_field, entry.image_field, split=entry.split,
                                name=entry.name or "file", what=f"generators.{index}.path",
                                prompt_key=lambda prompt: apply_template(config.data.prompt_template, prompt))
            source = Path(entry.path).expanduser()
            built[index] = ImageFileSampler(table, source.parent if source.is_file() else source)
    return built


def build_generator(config: DiffusionRaftConfig, external: dict[int, Generator], policy: DiffusionPolicy) -> Generator:
    """The generator of the training samples: one part, or a `Mixture` of the parts by share."""
    parts = []
    for index, entry in enumerate(config.generators):
        if entry.kind == "policy":
            settings = config.generation
            if entry.sampling_negative_prompt is not None:
                settings = replace(settings, negative_prompt=entry.sampling_negative_prompt)
            if entry.sampling_guidance_scale is not None:
                settings = replace(settings, guidance_scale=entry.sampling_guidance_scale)
            parts.append(DiffusionSampler(policy, settings))
        else:
            parts.append(external[index])
    return assemble(parts, config.generators)
