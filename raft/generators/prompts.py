"""Magic prompts: words added to a prompt when sampling only.

RAFT decouples generation from training, so a generator may be asked something better than the task prompt
("... Write an enthusiastic review.") while the policy is fine-tuned to answer the task prompt itself. The
wrapper below rewrites the prompts it passes on and gives each sample back its original prompt; the prompt
actually sent stays in `meta[META_PROMPT_SENT]`.
"""

from __future__ import annotations

from raft.interface import META_PROMPT_SENT, META_SETTINGS, Generator, Sample

PLACEHOLDER = "{prompt}"


def apply_template(template: str, prompt: str) -> str:
    """`template` with `{prompt}` replaced (plain replacement: other braces in a template are kept as they are)."""
    return template.replace(PLACEHOLDER, prompt)


class SamplingPrompt(Generator):
    """Sends `template` applied to each prompt to `inner`; samples keep the original prompt for fine-tuning."""

    def __init__(self, inner: Generator, template: str):
        if PLACEHOLDER not in template:
            raise ValueError(f"a sampling template must contain {PLACEHOLDER}, got {template!r}")
        self.inner, self.template = inner, template
        self.name = inner.name  # provenance names the generator that sampled, not this wrapper

    def generate(self, prompts: list[str], samples_per_prompt: int, seed: int) -> list[Sample]:
        sent = [apply_template(self.template, prompt) for prompt in prompts]
        samples = self.inner.generate(sent, samples_per_prompt, seed)
        for sample in samples:
            sample.prompt = prompts[sample.prompt_index]
            sample.meta[META_PROMPT_SENT] = sent[sample.prompt_index]
            sample.meta.setdefault(META_SETTINGS, {})["sampling_template"] = self.template
        return samples
