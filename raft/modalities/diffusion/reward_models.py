"""Published image reward models, loaded by hub id or local path and scored as their authors score them, on
transformers' own CLIP and BLIP code (no open_clip, no image-reward package: both pull in torchvision, whose
PyPI wheels do not import next to a CPU-only torch, and image-reward pins old timm/transformers).

- PickScore (Kirstain et al. 2023): a CLIP-H checkpoint; score = logit_scale.exp() x cos(image, prompt), as the
  authors' README computes it.
- HPSv2 (Wu et al. 2023): open_clip ViT-H-14 fine-tuned on HPD v2, shipped as an open_clip state dict
  (HPS_v2_compressed.pt). Its tensors are renamed onto transformers' CLIPModel built from the config of
  laion/CLIP-ViT-H-14-laion2B-s32B-b79K (the same architecture); score = cos(image, prompt), as hpsv2 reports it.
- ImageReward (Xu et al. 2023): BLIP (ViT-L/16 at 224 px + a BERT text encoder cross-attending to the image)
  and an MLP on the text encoder's [CLS] output, (mlp - 0.16717362830052426) / 1.0333394966054072. Its
  checkpoint (ImageReward.pt, BLIP's key names) is renamed onto transformers' BlipVisionModel and BlipTextModel,
  whose code is BLIP's; the text encoder's settings come from the med_config.json shipped beside it.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from raft.errors import RaftError
from raft.interface import Ranker, Sample

IMAGEREWARD_MEAN, IMAGEREWARD_STD = 0.16717362830052426, 1.0333394966054072
OPENAI_MEAN, OPENAI_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def hub_file(spec: str, field: str) -> Path:
    """A local file, or `org/repo/path/in/repo` downloaded from the hub (only when the user names one)."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    parts = spec.split("/")
    if spec.startswith((".", "/", "~")) or len(parts) < 3:
        raise RaftError(f"{field}: no such file '{spec}' (hub files are written org/repo/file)")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id="/".join(parts[:2]), filename="/".join(parts[2:])))
    except Exception as error:  # offline, missing repo or file: huggingface_hub raises several types
        raise RaftError(f"{field}: cannot download '{spec}': {_first_line(error)}") from None


# ----------------------------------------------------------------------------------------------
# HPSv2: an open_clip state dict on transformers' CLIPModel


def open_clip_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip CLIP (OpenAI layout: fused in_proj, c_fc/c_proj, proj matrices) -> transformers CLIPModel keys."""
    out: dict[str, torch.Tensor] = {}
    blocks = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
              "attn.out_proj": "self_attn.out_proj"}
    for key, value in state.items():
        tower, rest = ("vision_model", key[len("visual."):]) if key.startswith("visual.") else ("text_model", key)
        block = re.match(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$", rest) or \
            re.match(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$", rest)
        if rest.startswith("transformer.resblocks.") and block is None:
            raise RaftError(f"HPSv2 checkpoint: unexpected tensor '{key}'")
        if block is not None and "in_proj" in rest:
            layer, kind = block.groups()
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[f"{tower}.encoder.layers.{layer}.self_attn.{name}.{kind}"] = part
        elif block is not None:
            layer, name, kind = block.groups()
            if name not in blocks:
                raise RaftError(f"HPSv2 checkpoint: unexpected tensor '{key}'")
            out[f"{tower}.encoder.layers.{layer}.{blocks[name]}.{kind}"] = value
        elif key == "logit_scale":
            out["logit_scale"] = value
        elif key == "text_projection":
            out["text_projection.weight"] = value.t().contiguous()  # open_clip: x @ P; Linear: x @ W.T
        elif key == "visual.proj":
            out["visual_projection.weight"] = value.t().contiguous()
        else:
            names = {"token_embedding.weight": "text_model.embeddings.token_embedding.weight",
                     "positional_embedding": "text_model.embeddings.position_embedding.weight",
                     "ln_final.weight": "text_model.final_layer_norm.weight",
                     "ln_final.bias": "text_model.final_layer_norm.bias",
                     "visual.class_embedding": "vision_model.embeddings.class_embedding",
                     "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
                     "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
                     "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
                     "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
                     "visual.ln_post.weight": "vision_model.post_layernorm.weight",
                     "visual.ln_post.bias": "vision_model.post_layernorm.bias"}
            if key not in names:
                if key == "attn_mask" or key.endswith(".attn_mask"):
                    continue  # the causal mask buffer, rebuilt by CLIPModel
                raise RaftError(f"HPSv2 checkpoint: unexpected tensor '{key}'")
            out[names[key]] = value
    return out


def load_hpsv2(checkpoint: str, architecture: str, device: torch.device, dtype: torch.dtype, field: str):
    """A ClipEmbedder holding the HPSv2 weights: CLIPModel(config of `architecture`) <- the renamed checkpoint."""
    from transformers import CLIPConfig, CLIPModel

    from raft.modalities.diffusion.clip import HFClip
    from raft.modalities.diffusion.model import resolve_source
    from raft.modalities.diffusion.rankers import read_weights

    state = read_weights(str(hub_file(checkpoint, f"{field}.model")), f"{field}.model")
    source = resolve_source(architecture, f"{field}.processor")
    try:
        model = CLIPModel(CLIPConfig.from_pretrained(source))
    except (OSError, ValueError) as error:
        raise RaftError(f"{field}.processor: cannot read a CLIP config from '{architecture}': {_first_line(error)}") from None
    load_exactly(model, open_clip_to_hf(state), f"{field}.model", checkpoint)
    return HFClip(f"hpsv2:{checkpoint}", source, source, device, dtype, model=model)


# ----------------------------------------------------------------------------------------------
# ImageReward: BLIP's checkpoint on transformers' BLIP modules


def blip_vision_to_hf(key: str) -> str:
    """BLIP's ViT key (visual_encoder.*) -> BlipVisionModel's."""
    key = key.removeprefix("visual_encoder.")
    for old, new in [(r"^cls_token$", "embeddings.class_embedding"), (r"^pos_embed$", "embeddings.position_embedding"),
                     (r"^patch_embed\.proj\.", "embeddings.patch_embedding."), (r"^norm\.", "post_layernorm."),
                     (r"^blocks\.", "encoder.layers."), (r"\.norm1\.", ".layer_norm1."), (r"\.norm2\.", ".layer_norm2."),
                     (r"\.attn\.qkv\.", ".self_attn.qkv."), (r"\.attn\.proj\.", ".self_attn.projection.")]:
        key = re.sub(old, new, key)
    return key


class ImageRewardModel(torch.nn.Module):
    def __init__(self, vision_config, text_config):
        from transformers import BlipTextModel, BlipVisionModel

        from raft.modalities.diffusion.rankers import AestheticMLP

        super().__init__()
        self.vision = BlipVisionModel(vision_config)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        self.mlp = AestheticMLP(text_config.hidden_size)  # the same 768-1024-128-64-16-1 stack (layers.N keys)

    def forward(self, pixel_values, input_ids, attention_mask):
        image = self.vision(pixel_values=pixel_values).last_hidden_state
        image_mask = torch.ones(image.shape[:-1], dtype=torch.long, device=image.device)
        text = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image,
                         encoder_attention_mask=image_mask).last_hidden_state[:, 0, :]
        return (self.mlp(text.float()).squeeze(-1) - IMAGEREWARD_MEAN) / IMAGEREWARD_STD


def imagereward_configs(state: dict[str, torch.Tensor], med_config: dict):
    """BLIP's ViT settings read off the checkpoint's shapes (64-d heads, as in BLIP's ViT-B and ViT-L; LayerNorm
    eps 1e-6 as in its code); the text encoder's from med_config.json, cross-attending to the ViT's width."""
    from transformers import BlipTextConfig, BlipVisionConfig

    width = state["blip.visual_encoder.cls_token"].shape[-1]
    patch = state["blip.visual_encoder.patch_embed.proj.weight"].shape[-1]
    grid = math.isqrt(state["blip.visual_encoder.pos_embed"].shape[1] - 1)
    depth = 1 + max(int(k.split(".")[3]) for k in state if k.startswith("blip.visual_encoder.blocks."))
    vision = BlipVisionConfig(hidden_size=width, intermediate_size=state["blip.visual_encoder.blocks.0.mlp.fc1.weight"].shape[0],
                              num_hidden_layers=depth, num_attention_heads=max(1, width // 64), image_size=grid * patch,
                              patch_size=patch, layer_norm_eps=1e-6, hidden_act="gelu")
    keys = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "max_position_embeddings", "layer_norm_eps", "hidden_act", "pad_token_id"]
    text = BlipTextConfig(**{k: med_config[k] for k in keys if k in med_config}, encoder_hidden_size=width,
                          is_decoder=True)  # is_decoder builds the cross-attention layers; forward runs bidirectional
    text.hidden_dropout_prob = text.attention_probs_dropout_prob = 0.0
    return vision, text


def imagereward_files(spec: str, field: str) -> tuple[Path, Path]:
    """(ImageReward.pt, med_config.json): a folder or hub repo holding both, or the .pt file with the json beside it."""
    path = Path(spec).expanduser()
    if path.is_dir():
        checkpoint, med = path / "ImageReward.pt", path / "med_config.json"
    elif path.is_file():
        checkpoint, med = path, path.with_name("med_config.json")
    elif not spec.startswith((".", "/", "~")) and spec.count("/") == 1:  # a hub repo id
        return hub_file(f"{spec}/ImageReward.pt", field), hub_file(f"{spec}/med_config.json", field)
    else:
        raise RaftError(f"{field}: no such file or folder '{spec}'")
    for file in (checkpoint, med):
        if not file.is_file():
            raise RaftError(f"{field}: '{spec}' has no {file.name} (ImageReward ships ImageReward.pt and med_config.json)")
    return checkpoint, med


def load_imagereward(spec: str, tokenizer_source: str, device: torch.device, dtype: torch.dtype, field: str):
    from transformers import AutoTokenizer, CLIPImageProcessor

    from raft.modalities.diffusion.model import resolve_source
    from raft.modalities.diffusion.rankers import read_weights

    checkpoint, med = imagereward_files(spec, f"{field}.model")
    state = read_weights(str(checkpoint), f"{field}.model")
    if "blip.visual_encoder.cls_token" not in state or "mlp.layers.0.weight" not in state:
        raise RaftError(f"{field}.model: '{spec}' is not an ImageReward checkpoint (no blip.visual_encoder / mlp tensors)")
    try:
        med_config = json.loads(med.read_text())
    except (OSError, ValueError) as error:
        raise RaftError(f"{field}.model: cannot read {med}: {_first_line(error)}") from None
    vision, text = imagereward_configs(state, med_config)
    model = ImageRewardModel(vision, text)
    renamed = {}
    for key, value in state.items():
        if key.startswith("blip.visual_encoder."):
            renamed["vision." + blip_vision_to_hf(key.removeprefix("blip."))] = value
        elif key.startswith("blip.text_encoder."):
            renamed["text." + key.removeprefix("blip.text_encoder.")] = value
        elif key.startswith("mlp."):
            renamed[key] = value
    load_exactly(model, renamed, f"{field}.model", spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_source(tokenizer_source, f"{field}.processor"))
    except (OSError, ValueError) as error:
        raise RaftError(f"{field}.processor: cannot load the BERT tokenizer '{tokenizer_source}': {_first_line(error)}") from None
    size = vision.image_size  # ImageReward: Resize(224, bicubic), CenterCrop(224), CLIP's mean and std
    processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                   resample=3, image_mean=OPENAI_MEAN, image_std=OPENAI_STD)
    model = model.to(device, dtype).eval().requires_grad_(False)
    model.mlp.float()  # ImageReward runs its head in float32 whatever the encoders' dtype (txt_features.float())
    return model, tokenizer, processor


class ImageRewardRanker(Ranker):
    def __init__(self, model, tokenizer, processor, device: torch.device, dtype: torch.dtype, batch_size: int = 32,
                 name: str | None = None):
        self.model, self.tokenizer, self.processor = model, tokenizer, processor
        self.device, self.dtype, self.batch_size = device, dtype, batch_size
        self.name = name or "imagereward"

    @torch.no_grad()
    def score(self, samples: list[Sample]) -> list[float]:
        scores = []
        for start in range(0, len(samples), self.batch_size):
            batch = samples[start : start + self.batch_size]
            text = self.tokenizer([s.prompt for s in batch], padding="max_length", truncation=True, max_length=35,
                                  return_tensors="pt").to(self.device)
            pixels = self.processor(images=[s.output.convert("RGB") for s in batch], return_tensors="pt")["pixel_values"]
            scores += self.model(pixels.to(self.device, self.dtype), text["input_ids"], text["attention_mask"]).tolist()
        return scores


def load_exactly(model: torch.nn.Module, state: dict[str, torch.Tensor], field: str, spec: str) -> None:
    """Every parameter of `model` must come from the checkpoint, with its shape; a partial load scores noise."""
    expected = model.state_dict()
    missing = [k for k, v in expected.items() if k not in state and not _is_buffer(model, k)]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if k in state and state[k].shape != v.shape]
    if missing or wrong:
        what = f"lacks {missing[0]}" if missing else f"has {wrong[0]}"
        raise RaftError(f"{field}: '{spec}' does not fit the model ({what}; {len(missing) + len(wrong)} tensors off)")
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)


def _is_buffer(model: torch.nn.Module, key: str) -> bool:
    return key in dict(model.named_buffers())


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
