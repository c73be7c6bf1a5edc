"""Several generators sampling the same prompts, each supplying its share of the K samples of every prompt.

Splitting K per prompt (rather than splitting the prompts) lets selection compare the generators' outputs
for the same prompt: with shares policy 1, teacher 1 and K = 8, every prompt gets 4 samples from each, and
local selection keeps whichever is best.
"""

from __future__ import annotations

from raft.errors import RaftError
from raft.generators.prompts import PLACEHOLDER, SamplingPrompt
from raft.generators.sampling import seed_of
from raft.interface import Generator, Sample
from raft.shares import split_counts


class Mixture(Generator):
    """Runs each generator for its share of the samples and regroups the samples by prompt."""

    name = "mixture"

    def __init__(self, parts: list[Generator], shares: list[float]):
        if len(parts) != len(shares) or not parts:
            raise ValueError("a mixture needs one share per generator")
        names = [part.name for part in parts]
        if len(set(names)) != len(names):
            raise ValueError(f"generator names must be distinct, got {names}")
        self.parts, self.shares = parts, shares

    def generate(self, prompts: list[str], samples_per_prompt: int, seed: int) -> list[Sample]:
        counts = split_counts(self.shares, samples_per_prompt)
        by_prompt: list[list[Sample]] = [[] for _ in prompts]
        for index, (part, count) in enumerate(zip(self.parts, counts)):
            if count == 0:
                continue
            samples = part.generate(prompts, count, seed=seed_of(seed, index))  # each part its own random stream
            if len(samples) != count * len(prompts):
                raise RaftError(f"generator '{part.name}' returned {len(samples)} samples for "
                                f"{len(prompts)} prompts x {count}")
            for sample in samples:
                by_prompt[sample.prompt_index].append(sample)
        return [sample for group in by_prompt for sample in group]


def assemble(parts: list[Generator], entries: list) -> Generator:
    """The training generator of a `generators:` list: each part wrapped in its entry's magic prompt
    (`sampling_template`), then the single part, or a `Mixture` of the parts by the entries' shares."""
    parts = [part if entry.sampling_template == PLACEHOLDER else SamplingPrompt(part, entry.sampling_template)
             for part, entry in zip(parts, entries)]
    return parts[0] if len(parts) == 1 else Mixture(parts, [entry.share for entry in entries])
