"""Samples from a model loaded with vLLM in this process: a fast sampler for GPU machines (optional extra).

vLLM is imported only when this generator is built, so raft installs and runs without it. The model is
fixed for the run (a teacher, or a frozen copy of the starting policy): the policy's updated weights are
not pushed into vLLM. For vLLM sampling the policy itself, synced each iteration, see `generation.backend: vllm`
(raft/modalities/text/vllm_policy.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from raft.errors import RaftError
from raft.generators.sampling import SamplingSettings, chat_messages, seed_of
from raft.interface import META_FINISHED, META_GENERATOR, META_PROMPT_SENT, META_SETTINGS, Generator, Sample


def import_vllm(what: str = "kind vllm"):
    """The vllm module, or one line naming the setting (`what`) that asked for it."""
    try:
        import vllm
    except ImportError:
        raise RaftError(f"{what} needs the vllm package, which is not installed "
                        "(on a CUDA machine: pip install 'raft-align[vllm]')") from None
    return vllm


class VLLMSampler(Generator):
    def __init__(self, model: str, sampling: SamplingSettings, endpoint: str = "chat", name: str = "vllm",
                 system_prompt: str | None = None, seed: int = 0, vllm_args: dict[str, Any] | None = None,
                 progress: bool = True):
        self.vllm = import_vllm()
        self.model, self.sampling, self.endpoint, self.name = model, sampling, endpoint, name
        self.system_prompt, self.progress = system_prompt, progress
        try:
            self.llm = self.vllm.LLM(model=model, seed=seed, **(vllm_args or {}))
        except Exception as error:  # vLLM fails in many ways (no GPU, out of memory, unknown model)
            lines = str(error).strip().splitlines()
            raise RaftError(f"generator '{name}': vLLM cannot load '{model}': "
                            f"{lines[0] if lines else type(error).__name__}") from None

    def generate(self, prompts: list[str], samples_per_prompt: int, seed: int) -> list[Sample]:
        s = self.sampling
        budgets = s.budgets(len(prompts), np.random.default_rng(seed))
        params = [self.vllm.SamplingParams(n=samples_per_prompt, temperature=s.temperature, top_p=s.top_p,
                                           top_k=s.top_k if s.top_k > 0 else -1, max_tokens=budget,
                                           seed=seed_of(seed, index))
                  for index, budget in enumerate(budgets)]
        if self.endpoint == "chat":
            conversations = [chat_messages(prompt, self.system_prompt) for prompt in prompts]
            outputs = self.llm.chat(conversations, sampling_params=params, use_tqdm=self.progress)
        else:
            outputs = self.llm.generate(prompts, sampling_params=params, use_tqdm=self.progress)
        samples = []
        for index, (prompt, output) in enumerate(zip(prompts, outputs)):
            for completion in output.outputs:
                settings = {"model": self.model, "temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k,
                            "max_new_tokens": budgets[index], "seed": params[index].seed}
                if self.system_prompt:
                    settings["system_prompt"] = self.system_prompt
                samples.append(Sample(
                    prompt_index=index,
                    prompt=prompt,
                    output=completion.text.strip(),
                    meta={META_GENERATOR: self.name, META_PROMPT_SENT: prompt,
                          META_FINISHED: completion.finish_reason != "length", META_SETTINGS: settings},
                ))
        return samples
