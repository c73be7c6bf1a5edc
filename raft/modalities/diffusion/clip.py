"""CLIP embeddings of images and texts, L2-normalised, from Hugging Face CLIP-style models or open_clip.

    builtin:shapes-clip                      raft's small CLIP of the shapes world (offline)
    openai/clip-vit-large-patch14            any HF model with get_image_features/get_text_features (CLIP, PickScore)
    /path/to/folder                          the same, saved locally
    open_clip:ViT-H-14/laion2b_s32b_b79k     open_clip ARCH/PRETRAINED (needs open-clip-torch, imported only here)
    open_clip:hf-hub:org/name                open_clip model from the hub

Loaded models are cached per process, so a ranker and the diversity metric share one copy.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

from raft.errors import RaftError
from raft.modalities.diffusion.model import resolve_source

OPEN_CLIP_PREFIX = "open_clip:"


def features(output) -> torch.Tensor:
    """get_*_features return a tensor in transformers 4 and an output holding pooler_output in 5."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ClipEmbedder:
    """embed_images(images) and embed_texts(texts) -> float32 CPU tensors of unit rows."""

    def __init__(self, name: str, device: torch.device, dtype: torch.dtype):
        self.name, self.device, self.dtype = name, device, dtype

    @torch.no_grad()
    def embed_images(self, images: list, batch_size: int = 32) -> torch.Tensor:
        chunks = [self._images(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
        return F.normalize(torch.cat(chunks).float().cpu(), dim=-1)

    @torch.no_grad()
    def embed_texts(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        chunks = [self._texts(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]
        return F.normalize(torch.cat(chunks).float().cpu(), dim=-1)

    def _images(self, images: list) -> torch.Tensor:
        raise NotImplementedError

    def _texts(self, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError


class HFClip(ClipEmbedder):
    def __init__(self, name: str, source: str, processor_source: str, device: torch.device, dtype: torch.dtype,
                 model: torch.nn.Module | None = None):
        """`model`: weights already built (HPSv2's, renamed from open_clip) instead of loading `source`."""
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

        super().__init__(name, device, dtype)
        try:
            model = model if model is not None else AutoModel.from_pretrained(source, dtype=dtype)
            self.model = model.to(device, dtype).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(processor_source)
            self.image_processor = AutoImageProcessor.from_pretrained(processor_source)
        except (OSError, ValueError, KeyError) as error:
            raise RaftError(f"cannot load CLIP model '{name}': {_first_line(error)}") from None
        if not (hasattr(self.model, "get_image_features") and hasattr(self.model, "get_text_features")):
            raise RaftError(f"'{name}' is a {type(self.model).__name__}, not a CLIP-style model "
                            "(no get_image_features/get_text_features)")
        self.model.requires_grad_(False)
        positions = getattr(getattr(self.model.config, "text_config", None), "max_position_embeddings", 77)
        self.max_length = min(int(positions), int(getattr(self.tokenizer, "model_max_length", positions)))

    def _images(self, images: list) -> torch.Tensor:
        pixels = self.image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        return features(self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype)))

    def _texts(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt").to(self.device)
        return features(self.model.get_text_features(input_ids=tokens["input_ids"],
                                                     attention_mask=tokens.get("attention_mask")))

    @property
    def image_dim(self) -> int:
        return int(self.model.config.projection_dim)

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp())


class OpenClip(ClipEmbedder):
    def __init__(self, name: str, spec: str, device: torch.device, dtype: torch.dtype):
        try:
            import open_clip
        except ImportError:
            raise RaftError(f"CLIP model '{name}' needs open_clip (pip install open-clip-torch; it brings "
                            "torchvision, which must match the installed torch build)") from None
        super().__init__(name, device, dtype)
        try:
            if spec.startswith("hf-hub:"):
                model, _, preprocess = open_clip.create_model_and_transforms(spec)
                self.tokenizer = open_clip.get_tokenizer(spec)
            else:
                arch, _, pretrained = spec.partition("/")
                model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=pretrained or None)
                self.tokenizer = open_clip.get_tokenizer(arch)
        except Exception as error:  # open_clip raises RuntimeError, ValueError, OSError for unknown or absent models
            raise RaftError(f"cannot load CLIP model '{name}': {_first_line(error)}") from None
        self.model = model.to(device, dtype).eval().requires_grad_(False)
        self.preprocess = preprocess

    def _images(self, images: list) -> torch.Tensor:
        pixels = torch.stack([self.preprocess(im.convert("RGB")) for im in images]).to(self.device, self.dtype)
        return self.model.encode_image(pixels)

    def _texts(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(texts).to(self.device))

    @property
    def image_dim(self) -> int:
        return int(self.model.visual.output_dim)

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp())


def load_clip(name: str, processor: str | None = None, device: str = "cpu", dtype: str = "float32",
              field: str = "rankers") -> ClipEmbedder:
    """The embedder for `name` (see the module docstring), cached per process whatever `field` asks for it (errors
    name the field), so a ranker and the diversity metric share one copy of a large CLIP."""
    if name.startswith(OPEN_CLIP_PREFIX):
        return _cached(name, None, None, device, dtype)
    source = resolve_source(name, field)
    processor_source = resolve_source(processor, field) if processor else source
    return _cached(name, source, processor_source, device, dtype)


@lru_cache(maxsize=4)
def _cached(name: str, source: str | None, processor_source: str | None, device: str, dtype: str) -> ClipEmbedder:
    torch_device, torch_dtype = torch.device(device), getattr(torch, dtype)
    if name.startswith(OPEN_CLIP_PREFIX):
        return OpenClip(name, name.removeprefix(OPEN_CLIP_PREFIX), torch_device, torch_dtype)
    return HFClip(name, source, processor_source, torch_device, torch_dtype)


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
