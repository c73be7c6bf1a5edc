"""Image rankers: CLIP score, published preference models (PickScore, HPSv2, ImageReward, LAION aesthetic v2),
the LAION aesthetic predictor with any head, JPEG (in)compressibility, and Python callables.

- CLIP score: 100 x cosine(CLIP image embedding, CLIP text embedding of the prompt).
- PickScore: logit_scale.exp() x the same cosine, on yuvalkirstain/PickScore_v1 (processor:
  laion/CLIP-ViT-H-14-laion2B-s32B-b79K). HPSv2: the cosine, on HPS_v2_compressed.pt renamed onto CLIP ViT-H-14.
  ImageReward: BLIP + MLP head, standardised. See reward_models.py for how each is loaded.
- Aesthetic: a head over the L2-normalised CLIP image embedding (OpenAI CLIP ViT-L/14 for LAION's weights):
  the improved predictor (MLP 768-1024-128-64-16-1, `sac+logos+ava1-l14-linearMSE.pth`; kind
  laion-aesthetic-v2 fixes these defaults) or v1 (Linear(768, 1), `sa_0_4_vit_l_14_linear.pth`). Scores are on
  the AVA 1-10 scale.
- JPEG: the size of the image saved as JPEG at quality 95, in kB; compressibility is minus the size (DDPO).
"""

from __future__ import annotations

import io
from pathlib import Path

import torch
from torch import nn

from raft.errors import RaftError
from raft.interface import Ranker, Sample
from raft.modalities.diffusion.clip import ClipEmbedder, load_clip
from raft.modalities.diffusion.config import DiffusionRankerConfig
from raft.rankers import CallableRanker, combine

DEFAULT_CLIP = "builtin:shapes-clip"
DEFAULT_AESTHETIC_CLIP = "openai/clip-vit-large-patch14"
DEFAULT_AESTHETIC_WEIGHTS = "trl-lib/ddpo-aesthetic-predictor/aesthetic-model.pth"
VIT_H_14 = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
# each published model's defaults: `model` and `processor` (hub ids; local paths work the same)
PUBLISHED = {
    "pickscore": ("yuvalkirstain/PickScore_v1", VIT_H_14),
    "hpsv2": ("xswu/HPSv2/HPS_v2_compressed.pt", VIT_H_14),
    "imagereward": ("THUDM/ImageReward", "google-bert/bert-base-uncased"),
    "laion-aesthetic-v2": (DEFAULT_AESTHETIC_CLIP, None),
}


class ClipScoreRanker(Ranker):
    """scale x cosine(image, prompt): 100 for CLIP score, the model's logit scale for PickScore, 1 for HPSv2."""

    def __init__(self, embedder: ClipEmbedder, prompt_template: str = "{prompt}", batch_size: int = 32,
                 name: str | None = None, scale: float = 100.0):
        self.embedder, self.template, self.batch_size = embedder, prompt_template, batch_size
        self.name, self.scale = name or "clip_score", scale

    def score(self, samples: list[Sample]) -> list[float]:
        texts = sorted({self.template.replace("{prompt}", s.prompt) for s in samples})  # K samples share a prompt
        text_embeddings = dict(zip(texts, self.embedder.embed_texts(texts)))
        images = self.embedder.embed_images([s.output for s in samples], self.batch_size)
        targets = torch.stack([text_embeddings[self.template.replace("{prompt}", s.prompt)] for s in samples])
        return (self.scale * (images * targets).sum(-1)).tolist()


class AestheticMLP(nn.Module):
    """LAION's improved aesthetic predictor; layer indices match its checkpoints (layers.0 ... layers.7)."""

    def __init__(self, dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings)


def aesthetic_head(kind: str, dim: int) -> nn.Module:
    """The head's architecture; v1 is a bare Linear (its checkpoint keys are `weight` and `bias`)."""
    return AestheticMLP(dim) if kind == "mlp" else nn.Linear(dim, 1)


def read_weights(spec: str, field: str) -> dict[str, torch.Tensor]:
    """A state dict from a local file or a hub file `org/repo/path`, never unpickling arbitrary objects."""
    path = Path(spec).expanduser()
    if not path.is_file():
        parts = spec.split("/")
        if spec.startswith((".", "/", "~")) or len(parts) < 3:
            raise RaftError(f"{field}: no such file '{spec}' (hub files are written org/repo/file)")
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hf_hub_download(repo_id="/".join(parts[:2]), filename="/".join(parts[2:])))
        except Exception as error:  # offline, missing repo or file: huggingface_hub raises several types
            raise RaftError(f"{field}: cannot download '{spec}': {_first_line(error)}") from None
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a corrupt file or a pickle holding more than tensors
        raise RaftError(f"{field}: cannot read weights from '{spec}': {_first_line(error)}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RaftError(f"{field}: '{spec}' does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_aesthetic_head(spec: str, kind: str, dim: int, field: str) -> nn.Module:
    head = aesthetic_head(kind, dim)
    state = read_weights(spec, field)
    try:
        head.load_state_dict(state)
    except RuntimeError as error:
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in list(state.items())[:3])
        raise RaftError(f"{field}: '{spec}' does not fit the {kind} aesthetic head over {dim}-d CLIP embeddings "
                        f"({shapes}{', ...' if len(state) > 3 else ''})") from None
    return head.eval().requires_grad_(False)


class AestheticRanker(Ranker):
    def __init__(self, embedder: ClipEmbedder, head: nn.Module, batch_size: int = 32, name: str | None = None):
        self.embedder, self.head, self.batch_size = embedder, head, batch_size
        self.name = name or "aesthetic"

    @torch.no_grad()
    def score(self, samples: list[Sample]) -> list[float]:
        embeddings = self.embedder.embed_images([s.output for s in samples], self.batch_size)  # unit rows
        return self.head(embeddings).squeeze(-1).tolist()


def jpeg_kilobytes(image, quality: int = 95) -> float:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.tell() / 1000.0


class JpegRanker(Ranker):
    """+size (incompressibility) or -size (compressibility) of the image as JPEG, in kB."""

    def __init__(self, compressible: bool, quality: int = 95, name: str | None = None):
        self.sign, self.quality = (-1.0 if compressible else 1.0), quality
        self.name = name or ("compressibility" if compressible else "incompressibility")

    def score(self, samples: list[Sample]) -> list[float]:
        return [self.sign * jpeg_kilobytes(s.output, self.quality) for s in samples]


def clip_model_of(config: DiffusionRankerConfig) -> str:
    if config.kind in PUBLISHED:
        return config.model or PUBLISHED[config.kind][0]
    return config.model or (DEFAULT_CLIP if config.kind == "clip" else DEFAULT_AESTHETIC_CLIP)


def processor_of(config: DiffusionRankerConfig) -> str | None:
    return config.processor or (PUBLISHED[config.kind][1] if config.kind in PUBLISHED else None)


def build_published(config: DiffusionRankerConfig, device: torch.device, dtype: str, field: str) -> Ranker:
    """PickScore, HPSv2, ImageReward or LAION aesthetic v2, with the published defaults."""
    from raft.modalities.diffusion import reward_models

    model, processor = clip_model_of(config), processor_of(config)
    name = config.name or config.kind
    if config.kind == "pickscore":
        embedder = load_clip(model, processor, str(device), dtype, f"{field}.model")
        return ClipScoreRanker(embedder, config.prompt_template, config.batch_size, name, embedder.logit_scale)
    if config.kind == "hpsv2":
        if Path(model).expanduser().is_dir():  # already in transformers' CLIP layout
            embedder = load_clip(model, config.processor, str(device), dtype, f"{field}.model")
        else:
            embedder = reward_models.load_hpsv2(model, processor, device, getattr(torch, dtype), field)
        return ClipScoreRanker(embedder, config.prompt_template, config.batch_size, name, scale=1.0)
    if config.kind == "imagereward":
        parts = reward_models.load_imagereward(model, processor, device, getattr(torch, dtype), field)
        return reward_models.ImageRewardRanker(*parts, device, getattr(torch, dtype), config.batch_size, name)
    embedder = load_clip(model, processor, str(device), dtype, f"{field}.model")  # laion-aesthetic-v2
    head = load_aesthetic_head(config.weights or DEFAULT_AESTHETIC_WEIGHTS, "mlp", embedder.image_dim, f"{field}.weights")
    return AestheticRanker(embedder, head, config.batch_size, name)


def build_ranker(configs: list[DiffusionRankerConfig], device: torch.device, dtype: str = "float32") -> Ranker:
    """One ranker, or their weighted sum when several are configured (or one has a weight other than 1)."""
    rankers = []
    for i, config in enumerate(configs):
        field = f"rankers.{i}"
        if config.kind in PUBLISHED:
            ranker = build_published(config, device, dtype, field)
        elif config.kind in ("clip", "aesthetic"):
            embedder = load_clip(clip_model_of(config), config.processor, str(device), dtype, f"{field}.model")
            if config.kind == "clip":
                ranker = ClipScoreRanker(embedder, config.prompt_template, config.batch_size, config.name)
            else:
                weights = config.weights or DEFAULT_AESTHETIC_WEIGHTS
                head = load_aesthetic_head(weights, config.head, embedder.image_dim, f"{field}.weights")
                ranker = AestheticRanker(embedder, head, config.batch_size, config.name)
        elif config.kind in ("compressibility", "incompressibility"):
            ranker = JpegRanker(config.kind == "compressibility", config.jpeg_quality, config.name)
        else:
            ranker = CallableRanker(config.function, config.name)
        rankers.append((ranker, config.weight))
    return combine(rankers)


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
