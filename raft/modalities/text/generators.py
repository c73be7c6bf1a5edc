"""The text modality's training generator, built from `config.generators`: the policy, files, servers, vLLM,
each with its magic prompt, mixed by share when there are several."""

from __future__ import annotations

import os

from raft.config import generator_name
from raft.errors import RaftError
from raft.generators import FileSampler, OpenAICompatibleSampler, SamplingSettings
from raft.generators.mixture import assemble
from raft.generators.prompts import apply_template
from raft.interface import Generator
from raft.modalities.text.config import TextGeneratorConfig, TextRaftConfig
from raft.modalities.text.model import TextPolicy
from raft.modalities.text.sampler import TextSampler


def build_external_generators(config: TextRaftConfig) -> dict[int, Generator]:
    """Every generator but the policy, by position in the list. Built before the policy is loaded, so that a
    missing file or API key fails fast (and vLLM claims its GPU memory first)."""
    built = {}
    for index, entry in enumerate(config.generators):
        if entry.kind != "policy":
            built[index] = build_external(config, index, entry)
    return built


def build_external(config: TextRaftConfig, index: int, entry: TextGeneratorConfig) -> Generator:
    where, name = f"generators.{index}", generator_name(entry)
    g = config.generation
    sampling = SamplingSettings(g.temperature, g.top_p, g.top_k, g.max_new_tokens, g.max_new_tokens_range)
    system_prompt = entry.sampling_system_prompt if entry.sampling_system_prompt is not None else config.model.system_prompt
    if entry.kind == "file":
        # files hold task prompts, like data.prompts: the task template makes them what the loop asks for
        task = config.data.prompt_template
        return FileSampler(entry.path, entry.prompt_field, entry.response_field, split=entry.split, name=name,
                           prompt_key=lambda prompt: apply_template(task, prompt), what=f"{where}.path")
    if entry.kind == "http":
        api_key = None
        if entry.api_key_env:
            api_key = os.environ.get(entry.api_key_env)
            if not api_key:
                raise RaftError(f"{where}.api_key_env: the environment variable '{entry.api_key_env}' is not set")
        return OpenAICompatibleSampler(
            entry.url, entry.model, sampling, endpoint=entry.endpoint, name=name, api_key=api_key,
            system_prompt=system_prompt if entry.endpoint == "chat" else None,
            prompts_per_request=entry.prompts_per_request, max_concurrency=entry.max_concurrency,
            timeout_s=entry.timeout_s, max_retries=entry.max_retries, retry_backoff_s=entry.retry_backoff_s,
            request_params=entry.request_params)
    if entry.kind == "vllm":
        from raft.generators.vllm_sampler import VLLMSampler

        return VLLMSampler(entry.model, sampling, endpoint=entry.endpoint, name=name,
                           system_prompt=system_prompt if entry.endpoint == "chat" else None,
                           seed=config.seed, vllm_args=entry.vllm_args)
    raise ValueError(f"unknown generator kind {entry.kind!r}")  # validated earlier; kept for readers


def build_generator(config: TextRaftConfig, external: dict[int, Generator], policy: TextPolicy,
                    engine=None) -> Generator:
    """The generator of the training samples: one part, or a `Mixture` of the parts by share.

    `engine`: generation.backend vllm's engine (`start_policy_engine`), started before the policy was loaded;
    None: started here."""

    def policy_sampler(entry: TextGeneratorConfig) -> Generator:
        if config.generation.backend == "vllm":
            from raft.modalities.text.vllm_policy import VLLMPolicySampler, start_policy_engine

            nonlocal engine
            engine = engine or start_policy_engine(config)
            return VLLMPolicySampler(engine, policy, config.generation, system_prompt=entry.sampling_system_prompt)
        return TextSampler(policy, config.generation, system_prompt=entry.sampling_system_prompt)

    parts = [policy_sampler(entry) if entry.kind == "policy" else external[index]
             for index, entry in enumerate(config.generators)]
    return assemble(parts, config.generators)
