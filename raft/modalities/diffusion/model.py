"""Loading the policy: a diffusers text-to-image pipeline (hub id, local folder or builtin:shapes), its sampling
scheduler, and the trainable part, a LoRA adapter on the UNet (peft) or the whole UNet.

Checkpoints are what the fine-tuner saves: a LoRA adapter in the diffusers format (`pytorch_lora_weights.safetensors`,
loadable with `pipeline.load_lora_weights(folder)`), or a full UNet (`unet/`). A run resumes by loading the base
pipeline and then its last checkpoint, exactly as a user would.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from raft.errors import RaftError
from raft.finetune.distributed import resolve_device
from raft.modalities.diffusion.config import DiffusionLoraConfig, DiffusionModelConfig

ASSETS = Path(__file__).parent / "assets"
BUILTIN_PREFIX = "builtin:"
BUILTIN = {"shapes": "shapes-sd", "shapes-clip": "shapes-clip"}
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the file name diffusers' save_lora_weights writes
CHECKPOINT_INFO = "raft_checkpoint.json"


def builtin_path(name: str, field: str = "model.name_or_path") -> Path:
    """The folder of a model raft ships in its package (trained by scripts/train_offline_diffusion.py)."""
    if name not in BUILTIN:
        raise RaftError(f"{field}: unknown builtin model '{name}' (known: {', '.join('builtin:' + b for b in BUILTIN)})")
    path = ASSETS / BUILTIN[name]
    if not path.is_dir():
        raise RaftError(f"{field}: builtin:{name} is missing from this install ({path}); "
                        "recreate it with scripts/train_offline_diffusion.py")
    return path


def resolve_source(name_or_path: str, field: str = "model.name_or_path") -> str:
    """A local folder or a hub id; builtin:NAME becomes the packaged folder."""
    if name_or_path.startswith(BUILTIN_PREFIX):
        return str(builtin_path(name_or_path.removeprefix(BUILTIN_PREFIX), field))
    path = Path(name_or_path).expanduser()
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1  # hub ids: org/name
    if looks_local and not path.exists():
        raise RaftError(f"{field}: no such folder '{name_or_path}'")
    return str(path) if path.exists() else name_or_path


def scheduler_class(name: str):
    import diffusers

    classes = {
        "ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "pndm": "PNDMScheduler", "euler": "EulerDiscreteScheduler",
        "euler_ancestral": "EulerAncestralDiscreteScheduler", "dpm_solver": "DPMSolverMultistepScheduler",
        "unipc": "UniPCMultistepScheduler", "lms": "LMSDiscreteScheduler",
    }
    return getattr(diffusers, classes[name])


@dataclass
class DiffusionPolicy:
    """The pipeline being aligned and what sampling and training must agree on."""

    pipeline: object  # a diffusers StableDiffusionPipeline (or one with the same parts)
    device: torch.device
    dtype: torch.dtype  # of the frozen weights; trainable weights are float32
    lora: bool  # True: a LoRA adapter named "default" on the UNet is trained; False: the whole UNet

    @property
    def unet(self) -> torch.nn.Module:
        return self.pipeline.unet

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.unet.parameters() if p.requires_grad]

    def autocast(self):
        """Mixed precision where the frozen weights are not float32 (trainable ones always are)."""
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """The text encoder's conditioning for `prompts`, exactly as the pipeline computes it when sampling."""
        embeds, _ = self.pipeline.encode_prompt(prompts, self.device, 1, do_classifier_free_guidance=False)
        return embeds

    def default_resolution(self) -> int:
        return int(self.unet.config.sample_size) * int(self.pipeline.vae_scale_factor)


def load_policy(config: DiffusionModelConfig, lora: DiffusionLoraConfig, checkpoint: Path | None,
                seed: int = 0) -> DiffusionPolicy:
    """The base pipeline, its trainable part set up (a new LoRA seeded by `seed`, or the checkpoint's)."""
    device = resolve_device(config.device)
    dtype = getattr(torch, config.dtype)
    pipeline = load_pipeline(config, dtype)
    check_pipeline(pipeline, config.name_or_path)
    if config.scheduler != "default":
        pipeline.scheduler = scheduler_class(config.scheduler).from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    for part in ("vae", "text_encoder", "unet"):
        getattr(pipeline, part).requires_grad_(False)

    if lora.enabled:
        if checkpoint is not None:
            load_lora_checkpoint(pipeline, checkpoint)
        else:
            add_lora(pipeline.unet, lora, seed)
        for name, parameter in pipeline.unet.named_parameters():
            if "lora_" in name:
                parameter.requires_grad_(True)
                parameter.data = parameter.data.float()  # train the adapter in float32 (TRL's upcast)
    else:
        if checkpoint is not None:
            pipeline.unet = load_unet_checkpoint(checkpoint)
        pipeline.unet.float().requires_grad_(True)
    pipeline.to(device)
    for part in ("vae", "text_encoder", "unet"):
        getattr(pipeline, part).eval()
    return DiffusionPolicy(pipeline, device, dtype, lora.enabled)


def load_pipeline(config: DiffusionModelConfig, dtype: torch.dtype):
    from diffusers import DiffusionPipeline

    source = resolve_source(config.name_or_path)
    kwargs = {**dtype_argument(dtype), "revision": config.revision, "variant": config.variant}
    if not config.safety_checker:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    try:
        return DiffusionPipeline.from_pretrained(source, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise RaftError(f"model.name_or_path: cannot load '{config.name_or_path}': {_first_line(error)}") from None


def dtype_argument(dtype: torch.dtype) -> dict:
    """diffusers 0.36+ takes `dtype` and deprecates `torch_dtype`; older releases take only `torch_dtype`."""
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401 (present where `dtype` is)
    except ImportError:
        return {"torch_dtype": dtype}
    return {"dtype": dtype}


def check_pipeline(pipeline, name: str) -> None:
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    missing = [p for p in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if getattr(pipeline, p, None) is None]
    if missing or not hasattr(pipeline, "encode_prompt") or not isinstance(pipeline, StableDiffusionLoraLoaderMixin):
        raise RaftError(f"model.name_or_path: '{name}' is a {type(pipeline).__name__}; the diffusion modality needs a "
                        "Stable Diffusion-style pipeline (one UNet, VAE, CLIP text encoder and tokenizer)")


def add_lora(unet: torch.nn.Module, config: DiffusionLoraConfig, seed: int) -> None:
    from peft import LoraConfig

    peft_config = LoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout,
                             init_lora_weights="gaussian" if config.init == "gaussian" else True,
                             target_modules=list(config.target_modules))
    torch.manual_seed(seed)  # the adapter's initial weights follow from the run's seed
    try:
        unet.add_adapter(peft_config)
    except ValueError as error:
        raise RaftError(f"finetune.lora.target_modules: {_first_line(error)}") from None


def load_lora_checkpoint(pipeline, checkpoint: Path) -> None:
    if not (checkpoint / LORA_WEIGHTS).is_file():
        raise RaftError(f"cannot resume: '{checkpoint}' holds no LoRA adapter ({LORA_WEIGHTS}); was the run "
                        "made with finetune.lora.enabled=false?")
    pipeline.load_lora_weights(str(checkpoint), adapter_name="default")


def load_unet_checkpoint(checkpoint: Path):
    from diffusers import UNet2DConditionModel

    if not (checkpoint / "unet" / "config.json").is_file():
        raise RaftError(f"cannot resume: '{checkpoint}' holds no full UNet (unet/); was the run made with "
                        "finetune.lora.enabled=true?")
    return UNet2DConditionModel.from_pretrained(checkpoint / "unet", **dtype_argument(torch.float32))


def load_start_unet(config: DiffusionModelConfig, device: torch.device) -> torch.nn.Module:
    """The base pipeline's UNet, frozen: the start that finetune.anchor pulls a whole-UNet run toward (on resume
    too, the policy's own UNet being the checkpoint's by then)."""
    from diffusers import UNet2DConditionModel

    source = resolve_source(config.name_or_path)
    try:
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", revision=config.revision,
                                                    variant=config.variant, **dtype_argument(getattr(torch, config.dtype)))
    except (OSError, ValueError) as error:
        raise RaftError(f"model.name_or_path: cannot load the UNet of '{config.name_or_path}': {_first_line(error)}") from None
    return unet.requires_grad_(False).eval().to(device)


def save_policy(policy: DiffusionPolicy, directory: Path) -> None:
    """A LoRA adapter in the diffusers format (load_lora_weights reads it), or the full UNet."""
    if policy.lora:
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        unet = policy.unet
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name="default"))
        metadata = unet.peft_config["default"].to_dict()  # r, alpha, targets: restores the exact scale on load
        type(policy.pipeline).save_lora_weights(directory, unet_lora_layers=layers, unet_lora_adapter_metadata=metadata,
                                                safe_serialization=True)
    else:
        policy.unet.save_pretrained(directory / "unet", safe_serialization=True)
    info = {"kind": "lora" if policy.lora else "unet"}
    (directory / CHECKPOINT_INFO).write_text(json.dumps(info) + "\n")


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
