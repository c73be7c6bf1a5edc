"""The policy sampled by a vLLM engine (`generation.backend: vllm`): its training candidates, on a GPU.

vLLM samples many times faster than transformers' generate() on a GPU, but the engine holds its own copy of the
weights. After each fine-tuning that copy is stale, and nothing would fail if it stayed so: RAFT would rank and
train on samples of the starting model, iteration after iteration. So before each generate() call this sampler

- syncs the engine when the policy's weights changed since the last sync (found by comparing checksums):
  full fine-tuning pushes the weights into the engine's model (its `load_weights`, which takes Hugging Face
  names); LoRA saves the adapter (peft) to a fresh folder and samples through a `LoRARequest` with a fresh id,
  so vLLM cannot serve an adapter it cached for an older version;
- checks that the engine holds what was pushed: the checksum of the engine's own weights (full fine-tuning), or
  of the adapter file it is handed (LoRA), must equal the policy's, else the run stops;
- records in each sample the version of the weights (1, 2, ...: one per sync) and their checksum, so that
  samples.jsonl shows which policy drew every sample.

Each sample also records its token ids exactly as drawn, so fine-tuning trains on them, as with the hf sampler;
its log-probability is not recorded (see `VLLMPolicySampler.generate`).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from raft.errors import RaftError
from raft.generators.sampling import draw_budgets, seed_of
from raft.generators.vllm_sampler import import_vllm
from raft.interface import (META_FINISHED, META_GENERATOR, META_PROMPT_SENT, META_PROMPT_TOKENS_CUT, META_SETTINGS,
                            META_TOKEN_IDS, META_WEIGHTS_CHECKSUM, META_WEIGHTS_VERSION, POLICY_GENERATOR, Generator,
                            Sample)
from raft.modalities.text.config import TextGenerationConfig, TextRaftConfig
from raft.modalities.text.model import TextPolicy, resolve_model_source

# LoRA ranks vLLM accepts as max_lora_rank; the engine is started with the smallest that holds finetune.lora.r
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 512)
# relative: the same values summed in float64 in another order (fused tensors, another device) differ in the last
# bits only (~1e-14), while one fine-tuning step at a small learning rate moves the sum of squares of a 100M-weight
# model by ~1e-8 of itself: the tolerance must stay far below that, or a stale engine would pass the check
CHECKSUM_TOLERANCE = 1e-10


def weights_checksum(tensors: Iterable[torch.Tensor], dtype: torch.dtype | None = None) -> float:
    """The sum of squares of all the weights (in float64, after casting each to `dtype` when given).

    Cheap, and the same however an engine lays the weights out: vLLM fuses the q/k/v and gate/up projections into
    one tensor each and pads the vocabulary with zero rows, none of which changes a sum of squares; a fine-tuning
    step changes it (almost surely). Casting to the engine's dtype first makes the policy's side round as the
    engine's copy did."""
    total = 0.0
    for tensor in tensors:
        tensor = tensor.detach()
        total += float((tensor.to(dtype) if dtype is not None else tensor).double().square().sum())
    return total


def same_checksum(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=CHECKSUM_TOLERANCE, abs_tol=1e-12)


class PolicyEngine:
    """The few calls raft makes into vLLM, in one place: `vllm.LLM(...)`, `LLM.generate`, `LLM.apply_model` (or the
    older driver worker's model), `SamplingParams` and `LoRARequest`. What differs between vLLM versions is handled
    here, and the tests' fake vllm module implements the same small surface."""

    def __init__(self, vllm, model: str, seed: int, llm_args: dict[str, Any]):
        self.vllm = vllm
        try:
            self.llm = vllm.LLM(model=model, seed=seed, **llm_args)
        except Exception as error:  # vLLM fails in many ways (no GPU, out of memory, an unsupported model)
            lines = str(error).strip().splitlines()
            raise RaftError(f"generation.backend vllm: vLLM cannot load '{model}': "
                            f"{lines[0] if lines else type(error).__name__}") from None
        dtypes = self._on_model(lambda model: next(model.parameters()).dtype)
        self.dtype = dtypes[0] if dtypes else None  # the engine's weights dtype, for the policy side of the checksum

    def _on_model(self, function) -> list | None:
        """`function(model)` on the engine's model in each worker, or None where this vLLM gives no way in."""
        if hasattr(self.llm, "apply_model"):  # recent vLLM; in-process when VLLM_ENABLE_V1_MULTIPROCESSING=0
            return list(self.llm.apply_model(function))
        try:  # older vLLM (V0): the model sits in this process's driver worker
            model = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        except AttributeError:
            return None
        return [function(model)]

    def load_weights(self, named: list[tuple[str, torch.Tensor]]) -> None:
        def load(model):
            model.load_weights(weights=iter(named))  # Hugging Face names; fuses and casts as it loads a checkpoint

        if self._on_model(load) is None:
            raise RaftError("generation.backend vllm: this vLLM version gives no access to the engine's model "
                            "(LLM.apply_model), so fine-tuned weights cannot be pushed into it")

    def checksum(self) -> float | None:
        """The engine's weights checksum, or None when it cannot be read back: no access to the model, or several
        workers (tensor parallel: each holds shards and replicas, which do not add up to the whole)."""
        sums = self._on_model(lambda model: weights_checksum(model.parameters()))
        return sums[0] if sums and len(sums) == 1 else None

    def generate(self, prompt_ids: list[list[int]], params: list, lora_request=None, progress: bool = True) -> list:
        # token ids, not text: the engine sees exactly the prompt the policy is trained on (template, system
        # prompt and left cut applied by TextPolicy), whatever its own tokenizer or chat template would do
        return self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], sampling_params=params,
                                 use_tqdm=progress, lora_request=lora_request)


def start_policy_engine(config: TextRaftConfig) -> PolicyEngine:
    """The engine of `generation.backend: vllm`, on the starting model. Started before the policy is loaded: a
    missing vllm fails before anything heavy, and vLLM measures free GPU memory when it starts."""
    vllm = import_vllm("generation.backend vllm")
    source, _ = resolve_model_source(config.model.name_or_path, None)
    args: dict[str, Any] = {"dtype": config.model.dtype, "revision": config.model.revision,
                            "trust_remote_code": config.model.trust_remote_code}
    lora = config.finetune.lora
    if lora.enabled:
        args |= {"enable_lora": True, "max_lora_rank": next((r for r in VLLM_LORA_RANKS if r >= lora.r), lora.r)}
    # vLLM's V1 engine runs in a child process by default: apply_model would then pickle every weight across. In
    # this process, pushing weights is a copy on the GPU (TRL's colocate mode does the same)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    return PolicyEngine(vllm, source, config.seed, args | config.generation.vllm_args)


class VLLMPolicySampler(Generator):
    name = POLICY_GENERATOR

    def __init__(self, engine: PolicyEngine, policy: TextPolicy, config: TextGenerationConfig,
                 system_prompt: str | None = None, progress: bool = True):
        self.engine, self.policy, self.config = engine, policy, config
        self.system_prompt, self.progress = system_prompt, progress
        self.lora = hasattr(policy.model, "peft_config")
        self.version, self.synced = 0, None  # synced: the checksum of the weights the engine holds (None: never)
        self.lora_request = None
        self.adapters = Path(tempfile.mkdtemp(prefix="raft-vllm-lora-")) if self.lora else None
        if self.adapters is not None:
            weakref.finalize(self, shutil.rmtree, self.adapters, True)

    def _policy_weights(self) -> list[tuple[str, torch.Tensor]]:
        model = self.policy.model
        if self.lora:  # the adapter only: the base weights never change
            return [(name, p) for name, p in model.named_parameters() if "lora_" in name]
        return list(model.named_parameters())  # tied weights once, as the engine holds them

    def sync(self) -> None:
        """Pushes the policy's weights into the engine if they changed since the last sync, and checks that the
        engine holds them. The first call always pushes: the engine starts from the starting model, the policy may
        have been resumed from a checkpoint."""
        named = self._policy_weights()
        checksum = weights_checksum((t for _, t in named), None if self.lora else self.engine.dtype)
        if checksum == self.synced:  # exact: computed the same way on the same weights, it is the same float
            return
        self.version += 1
        if self.lora:
            folder = self.adapters / f"v{self.version}"
            self.policy.model.save_pretrained(folder)
            # a fresh id per version: vLLM caches adapters by id, and would keep serving the old one under the same id
            self.lora_request = self.engine.vllm.LoRARequest(f"policy-v{self.version}", self.version, str(folder))
            engine_side = adapter_checksum(folder)  # what the engine loads; reading its LoRA slots back is not public
            shutil.rmtree(self.adapters / f"v{self.version - 2}", ignore_errors=True)  # older than the last: unused
        else:
            self.engine.load_weights([(name, t.detach()) for name, t in named])
            engine_side = self.engine.checksum()  # None: no read-back on this vLLM (see PolicyEngine.checksum)
        if engine_side is not None and not same_checksum(engine_side, checksum):
            raise RaftError(f"generation.backend vllm: the engine does not hold the policy's weights after sync "
                            f"{self.version} (weights checksum {engine_side:.10g}, the policy's {checksum:.10g})")
        self.synced = checksum

    @torch.no_grad()
    def generate(self, prompts: list[str], samples_per_prompt: int, seed: int) -> list[Sample]:
        self.sync()
        k, config = samples_per_prompt, self.config
        rng = np.random.default_rng(seed)  # the same budgets as the hf sampler draws for this seed
        budgets = draw_budgets(config.max_new_tokens, config.max_new_tokens_range, len(prompts), rng)
        encoded, cut = zip(*(self.policy.encode_prompt_cut(p, self.system_prompt) for p in prompts)) if prompts else ((), ())
        eos_ids = self.policy.eos_ids
        greedy = config.temperature == 0
        # No logprobs requested: vLLM's come from other kernels (and, in recent versions, before temperature unless
        # logprobs_mode says otherwise), so they are not log pi(y|x) as the hf forward computes it. Without
        # meta.logprob, KL-regularized ranking computes the policy's side with transformers, as for any sample
        # from elsewhere: one more forward pass, but the same numbers whichever backend sampled.
        params = [self.engine.vllm.SamplingParams(
            n=k, temperature=config.temperature, top_p=1.0 if greedy else config.top_p,
            top_k=config.top_k if config.top_k > 0 and not greedy else -1, max_tokens=budget,
            seed=seed_of(seed, index), stop_token_ids=sorted(eos_ids))
            for index, budget in enumerate(budgets)]
        outputs = self.engine.generate(list(encoded), params, lora_request=self.lora_request, progress=self.progress)
        settings = {"temperature": config.temperature, "top_p": config.top_p, "top_k": config.top_k, "backend": "vllm"}
        if self.system_prompt is not None:
            settings["system_prompt"] = self.system_prompt
        samples = []
        for index, (prompt, output) in enumerate(zip(prompts, outputs)):
            for completion in output.outputs:
                tokens = list(completion.token_ids)[: budgets[index]]
                end = next((j for j, t in enumerate(tokens) if t in eos_ids), None)
                stop = getattr(completion, "stop_reason", None)
                if end is None and completion.finish_reason == "stop" and isinstance(stop, int):
                    tokens.append(stop)  # a vLLM that leaves the stop token out: fine-tuning must still learn to stop
                    end = len(tokens) - 1
                kept = len(tokens) if end is None else end + 1
                samples.append(Sample(
                    prompt_index=index,
                    prompt=prompt,
                    output=self.policy.tokenizer.decode(tokens[:end], skip_special_tokens=True).strip(),
                    meta={
                        META_GENERATOR: self.name,
                        META_PROMPT_SENT: prompt,
                        META_FINISHED: end is not None,
                        "new_tokens": kept,
                        META_TOKEN_IDS: tokens[:kept],  # exactly as sampled, EOS included: what fine-tuning trains on
                        META_SETTINGS: settings | {"max_new_tokens": budgets[index], "seed": params[index].seed},
                        META_WEIGHTS_VERSION: self.version,
                        META_WEIGHTS_CHECKSUM: self.synced,
                        **({META_PROMPT_TOKENS_CUT: cut[index]} if cut[index] else {}),
                    },
                ))
        return samples


def adapter_checksum(folder: Path) -> float:
    """The checksum of a saved peft adapter, as the engine will read it from the folder."""
    from safetensors.torch import load_file

    return weights_checksum(load_file(str(folder / "adapter_model.safetensors")).values())
