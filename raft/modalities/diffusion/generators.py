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
from raft.config import generator_name
from raft.interface import META_SETTINGS, Generator, Sample
from raft.modalities.diffusion.config import DiffusionRaftConfig
from raft.modalities.diffusion.model import DiffusionPolicy
from raft.modalities.diffusion.sampler import DiffusionSampler


class ImageFileSampler(Generator):
    """Pre-generated images: a table of (prompt, image path) rows; relative paths are read from the table's
    folder, so a previous run's iteration folder (samples.jsonl + images/) works as it is."""

    def __init__(self, table: FileSampler, folder: Path, allow_outside_paths: bool = False):
        self.table, self.folder, self.name = table, folder, table.name
        self.allow_outside_paths = allow_outside_paths

    @property
    def prompts(self) -> list[str]:
        return self.table.prompts

    def generate(self, prompts: list[str], samples_per_prompt: int, seed: int) -> list[Sample]:
        samples = self.table.generate(prompts, samples_per_prompt, seed)
        for sample in samples:
            path = Path(sample.output).expanduser()
            path = path if path.is_absolute() else self.folder / path
            row = sample.meta[META_SETTINGS]["row"]
            if not self.allow_outside_paths and not path.resolve().is_relative_to(self.folder.resolve()):
                raise RaftError(f"{self.table.what}: the image '{path}' (row {row}) is outside the file's folder "
                                f"'{self.folder}'; set allow_outside_paths: true on this generator to read it")
            sample.output = read_image(path, self.table.what, row)
            sample.meta[META_SETTINGS]["image"] = str(path)
        return samples


MAX_IMAGE_PIXELS = 4096 * 4096  # far above any training resolution; decoding more is a bomb or a mistake


def read_image(path: Path, what: str, row: int) -> Image.Image:
    """An RGB image from a file, refused in one line when unreadable, larger than MAX_IMAGE_PIXELS (checked from the
    header, before anything is decoded) or a decompression bomb."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if image.width * image.height > MAX_IMAGE_PIXELS:
                    raise RaftError(f"{what}: the image '{path}' (row {row}) is {image.width} x {image.height} "
                                    f"pixels, more than the {MAX_IMAGE_PIXELS:,} accepted")
                return image.convert("RGB")
    except RaftError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise RaftError(f"{what}: the image '{path}' (row {row}) is refused as a decompression bomb") from None
    except (OSError, ValueError, SyntaxError) as error:
        raise RaftError(f"{what}: cannot read the image '{path}' (row {row}): {error}") from None


def build_external_generators(config: DiffusionRaftConfig) -> dict[int, Generator]:
    """The file generators, by position in the list; built before the pipeline loads, so bad files fail fast."""
    built = {}
    for index, entry in enumerate(config.generators):
        if entry.kind == "file":
            table = FileSampler(entry.path, entry.prompt_field, entry.image_field, split=entry.split,
                                name=generator_name(entry), what=f"generators.{index}.path",
                                prompt_key=lambda prompt: apply_template(config.data.prompt_template, prompt))
            source = Path(entry.path).expanduser()
            built[index] = ImageFileSampler(table, source.parent if source.is_file() else source,
                                            allow_outside_paths=entry.allow_outside_paths)
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
