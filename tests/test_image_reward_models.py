"""PickScore, HPSv2, ImageReward and LAION aesthetic v2 rankers on tiny stand-ins saved to tmp dirs and loaded by
local path (no network). Each checkpoint is written in its publisher's layout (open_clip for HPSv2, BLIP's names
for ImageReward) and the scores are checked against a forward pass written here from the original code's
structure, not through raft's renaming."""

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

pytest.importorskip("diffusers")

from raft.errors import RaftError
from raft.interface import Sample
from raft.modalities.diffusion.clip import load_clip
from raft.modalities.diffusion.config import DiffusionRankerConfig
from raft.modalities.diffusion.model import builtin_path
from raft.modalities.diffusion.rankers import AestheticMLP, build_ranker
from raft.modalities.diffusion.reward_models import IMAGEREWARD_MEAN, IMAGEREWARD_STD
from raft.modalities.diffusion.world import draw, parse

CPU = torch.device("cpu")


def noise_image(seed, size=16):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, size=(size, size, 3)).astype(np.uint8))


def ranker(kind, **settings):
    return build_ranker([DiffusionRankerConfig(kind=kind, **settings)], CPU)


# ----------------------------------------------------------------------------------------------
# PickScore: a CLIP checkpoint without processor files; score = logit_scale.exp() * cos


def test_pickscore_is_logit_scale_times_cosine_and_prefers_the_matching_prompt(tmp_path):
    from safetensors.torch import load_file

    shapes = builtin_path("shapes-clip", "test")  # raft's trained CLIP of the shapes world stands in for CLIP-H
    bare = tmp_path / "pickscore"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):  # PickScore_v1 ships no tokenizer: `processor` supplies it
        shutil.copy(shapes / name, bare / name)
    pick = ranker("pickscore", model=str(bare), processor=str(shapes))
    assert pick.name == "pickscore"

    caption, other = "a red circle above a blue square", "a green triangle left of a yellow star"
    image = draw(parse(caption), np.random.default_rng(0))
    batch = [Sample(0, caption, image), Sample(0, other, image)]
    scores = pick.score(batch)
    assert scores[0] > scores[1]

    embedder = load_clip(str(shapes))
    cos = (embedder.embed_images([image]) * embedder.embed_texts([caption, other])).sum(-1)
    scale = float(load_file(str(shapes / "model.safetensors"))["logit_scale"].exp())
    assert scale != pytest.approx(100.0)  # the formula's scale is the model's, not CLIP score's 100
    assert scores == pytest.approx((scale * cos).tolist(), abs=1e-4)


# ----------------------------------------------------------------------------------------------
# HPSv2: an open_clip state dict; score = cos


def tiny_open_clip_state(width=32, layers=2, heads=2, patch=4, size=16, vocab=None, context=16, embed=16, seed=0):
    """Random weights in open_clip's CLIP layout (the layout of HPS_v2_compressed.pt's state_dict)."""
    g = torch.Generator().manual_seed(seed)

    def t(*shape, scale=0.1):
        return torch.randn(*shape, generator=g) * scale

    state = {"logit_scale": torch.tensor(4.6052), "token_embedding.weight": t(vocab, width),
             "positional_embedding": t(context, width), "ln_final.weight": 1 + t(width), "ln_final.bias": t(width),
             "text_projection": t(width, embed), "visual.class_embedding": t(width),
             "visual.positional_embedding": t((size // patch) ** 2 + 1, width), "visual.conv1.weight": t(width, 3, patch, patch),
             "visual.ln_pre.weight": 1 + t(width), "visual.ln_pre.bias": t(width), "visual.ln_post.weight": 1 + t(width),
             "visual.ln_post.bias": t(width), "visual.proj": t(width, embed)}
    for tower in ("", "visual."):
        for i in range(layers):
            p = f"{tower}transformer.resblocks.{i}."
            state.update({p + "ln_1.weight": 1 + t(width), p + "ln_1.bias": t(width), p + "ln_2.weight": 1 + t(width),
                          p + "ln_2.bias": t(width), p + "attn.in_proj_weight": t(3 * width, width),
                          p + "attn.in_proj_bias": t(3 * width), p + "attn.out_proj.weight": t(width, width),
                          p + "attn.out_proj.bias": t(width), p + "mlp.c_fc.weight": t(4 * width, width),
                          p + "mlp.c_fc.bias": t(4 * width), p + "mlp.c_proj.weight": t(width, 4 * width),
                          p + "mlp.c_proj.bias": t(width)})
    return state


def open_clip_forward(state, prefix, x, heads, mask=None):
    """open_clip's residual attention blocks: nn.MultiheadAttention on the fused in_proj, GELU MLP."""
    width = x.shape[-1]
    i = 0
    while f"{prefix}transformer.resblocks.{i}.ln_1.weight" in state:
        p = {k.removeprefix(f"{prefix}transformer.resblocks.{i}."): v for k, v in state.items()
             if k.startswith(f"{prefix}transformer.resblocks.{i}.")}
        attention = nn.MultiheadAttention(width, heads, batch_first=True)
        attention.load_state_dict({"in_proj_weight": p["attn.in_proj_weight"], "in_proj_bias": p["attn.in_proj_bias"],
                                   "out_proj.weight": p["attn.out_proj.weight"], "out_proj.bias": p["attn.out_proj.bias"]})
        h = F.layer_norm(x, (width,), p["ln_1.weight"], p["ln_1.bias"])
        x = x + attention(h, h, h, need_weights=False, attn_mask=mask)[0]
        h = F.layer_norm(x, (width,), p["ln_2.weight"], p["ln_2.bias"])
        x = x + F.linear(F.gelu(F.linear(h, p["mlp.c_fc.weight"], p["mlp.c_fc.bias"])), p["mlp.c_proj.weight"], p["mlp.c_proj.bias"])
        i += 1
    return x


def hps_reference(state, pixels, tokens, eos, heads=2):
    """cos(image, text) as open_clip's CLIP computes the features (encode_image / encode_text, normalize=True)."""
    s = state
    width = s["visual.class_embedding"].shape[0]
    x = F.conv2d(pixels, s["visual.conv1.weight"], stride=s["visual.conv1.weight"].shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([s["visual.class_embedding"].expand(x.shape[0], 1, -1), x], 1) + s["visual.positional_embedding"]
    x = F.layer_norm(x, (width,), s["visual.ln_pre.weight"], s["visual.ln_pre.bias"])
    x = open_clip_forward(s, "visual.", x, heads)
    image = F.layer_norm(x[:, 0], (width,), s["visual.ln_post.weight"], s["visual.ln_post.bias"]) @ s["visual.proj"]
    t = s["token_embedding.weight"][tokens] + s["positional_embedding"][: tokens.shape[1]]
    causal = torch.full((tokens.shape[1], tokens.shape[1]), float("-inf")).triu(1)
    t = F.layer_norm(open_clip_forward(s, "", t, heads, causal), (width,), s["ln_final.weight"], s["ln_final.bias"])
    text = t[torch.arange(tokens.shape[0]), (tokens == eos).int().argmax(-1)] @ s["text_projection"]
    return (F.normalize(image, dim=-1) * F.normalize(text, dim=-1)).sum(-1)


@pytest.fixture
def hps_stand_in(tiny_clip_dir, tmp_path):
    """(checkpoint.pt as HPSv2 ships it, a ViT-H-14-style folder: CLIP config + tokenizer + image processor)."""
    from transformers import CLIPConfig, CLIPTokenizerFast

    architecture = tmp_path / "vit-h-14"
    shutil.copytree(tiny_clip_dir, architecture)
    (architecture / "model.safetensors").unlink()  # only the config, tokenizer and processor are read
    tokenizer = CLIPTokenizerFast.from_pretrained(architecture)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16, hidden_act="gelu",
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(image_size=16, patch_size=4, hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=2, hidden_act="gelu"),
        projection_dim=16)
    config.save_pretrained(architecture)
    state = tiny_open_clip_state(vocab=len(tokenizer))
    checkpoint = tmp_path / "HPS_v2_compressed.pt"
    torch.save({"state_dict": {f"module.{k}": v.half() for k, v in state.items()}}, checkpoint)  # as DDP saved it
    return checkpoint, architecture, {k: v.half().float() for k, v in state.items()}, tokenizer


def test_hpsv2_open_clip_checkpoint_scores_its_cosine(hps_stand_in):
    from transformers import CLIPImageProcessor

    checkpoint, architecture, state, tokenizer = hps_stand_in
    hps = ranker("hpsv2", model=str(checkpoint), processor=str(architecture))
    prompts = ["a red circle", "a blue square above a red circle", "a green star"]
    batch = [Sample(i, p, noise_image(i)) for i, p in enumerate(prompts)]
    scores = hps.score(batch)

    pixels = CLIPImageProcessor.from_pretrained(architecture)(images=[s.output for s in batch], return_tensors="pt")
    tokens = tokenizer(prompts, padding=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = hps_reference(state, pixels["pixel_values"], tokens, tokenizer.eos_token_id)
    assert all(-1 <= s <= 1 for s in scores)
    assert scores == pytest.approx(expected.tolist(), abs=2e-4)
    assert max(scores) - min(scores) > 1e-3  # the stand-in is not degenerate


def test_hpsv2_checkpoint_that_does_not_fit_is_one_line(hps_stand_in, tmp_path):
    checkpoint, architecture, state, _ = hps_stand_in
    torch.save({"state_dict": {k: v for k, v in state.items() if "ln_post" not in k}}, tmp_path / "partial.pt")
    with pytest.raises(RaftError, match=r"rankers.0.model: '.*partial.pt' does not fit the model \(lacks vision_model.post_layernorm"):
        ranker("hpsv2", model=str(tmp_path / "partial.pt"), processor=str(architecture))
    with pytest.raises(RaftError, match="rankers.0.model: no such file"):
        ranker("hpsv2", model=str(tmp_path / "absent.pt"), processor=str(architecture))


# ----------------------------------------------------------------------------------------------
# ImageReward: BLIP's key names + med_config.json; score = (mlp([CLS]) - mean) / std


VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "circle", "square", "above", "photo", "of"]


@pytest.fixture
def imagereward_stand_in(tmp_path):
    """A folder like THUDM/ImageReward (ImageReward.pt in BLIP's names, med_config.json), and a BERT tokenizer."""
    from transformers import BertTokenizerFast

    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    BertTokenizerFast(vocab_file=str(tmp_path / "bert" / "vocab.txt")).save_pretrained(tmp_path / "bert")
    g = torch.Generator().manual_seed(0)

    def t(*shape, scale=0.1):
        return torch.randn(*shape, generator=g) * scale

    width, text_width, patch, size = 64, 32, 4, 16  # 64-d heads, as BLIP's ViTs
    state = {"blip.visual_encoder.cls_token": t(1, 1, width), "blip.visual_encoder.pos_embed": t(1, (size // patch) ** 2 + 1, width),
             "blip.visual_encoder.patch_embed.proj.weight": t(width, 3, patch, patch),
             "blip.visual_encoder.patch_embed.proj.bias": t(width),
             "blip.visual_encoder.norm.weight": 1 + t(width), "blip.visual_encoder.norm.bias": t(width),
             "blip.vision_proj.weight": t(8, width)}  # BLIP_Pretrain's projections are in the file and unused
    for i in range(2):
        p = f"blip.visual_encoder.blocks.{i}."
        state.update({p + "norm1.weight": 1 + t(width), p + "norm1.bias": t(width), p + "norm2.weight": 1 + t(width),
                      p + "norm2.bias": t(width), p + "attn.qkv.weight": t(3 * width, width), p + "attn.qkv.bias": t(3 * width),
                      p + "attn.proj.weight": t(width, width), p + "attn.proj.bias": t(width),
                      p + "mlp.fc1.weight": t(4 * width, width), p + "mlp.fc1.bias": t(4 * width),
                      p + "mlp.fc2.weight": t(width, 4 * width), p + "mlp.fc2.bias": t(width)})
    med = {"vocab_size": len(VOCAB), "hidden_size": text_width, "num_hidden_layers": 2, "num_attention_heads": 2,
           "intermediate_size": 64, "max_position_embeddings": 64, "layer_norm_eps": 1e-12, "hidden_act": "gelu",
           "pad_token_id": 0, "add_cross_attention": True, "encoder_width": 768}
    from transformers import BlipTextConfig, BlipTextModel

    torch.manual_seed(1)
    text = BlipTextModel(BlipTextConfig(**{k: v for k, v in med.items() if k not in ("add_cross_attention", "encoder_width")},
                                        encoder_hidden_size=width, is_decoder=True), add_pooling_layer=False)
    with torch.no_grad():
        for p in text.parameters():
            p.add_(t(*p.shape, scale=0.05))
    state.update({f"blip.text_encoder.{k}": v for k, v in text.state_dict().items()})
    torch.manual_seed(2)
    head = AestheticMLP(text_width)
    state.update({f"mlp.{k}": v for k, v in head.state_dict().items()})
    folder = tmp_path / "ImageReward"
    folder.mkdir()
    torch.save(state, folder / "ImageReward.pt")
    (folder / "med_config.json").write_text(json.dumps(med))
    return folder, tmp_path / "bert", state, text.eval(), head.eval()


def blip_vit_reference(state, pixels, heads):
    """BLIP's VisionTransformer (timm-style blocks, LayerNorm eps 1e-6, fused qkv), from its code's structure."""
    s = {k.removeprefix("blip.visual_encoder."): v for k, v in state.items() if k.startswith("blip.visual_encoder.")}
    width = s["cls_token"].shape[-1]
    x = F.conv2d(pixels, s["patch_embed.proj.weight"], s["patch_embed.proj.bias"], stride=s["patch_embed.proj.weight"].shape[-1])
    x = torch.cat([s["cls_token"].expand(x.shape[0], -1, -1), x.flatten(2).transpose(1, 2)], 1) + s["pos_embed"]
    i = 0
    while f"blocks.{i}.norm1.weight" in s:
        p = {k.removeprefix(f"blocks.{i}."): v for k, v in s.items() if k.startswith(f"blocks.{i}.")}
        h = F.layer_norm(x, (width,), p["norm1.weight"], p["norm1.bias"], eps=1e-6)
        b, n, _ = h.shape
        q, k, v = F.linear(h, p["attn.qkv.weight"], p["attn.qkv.bias"]).reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
        a = ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(-1) @ v
        x = x + F.linear(a.transpose(1, 2).reshape(b, n, width), p["attn.proj.weight"], p["attn.proj.bias"])
        h = F.layer_norm(x, (width,), p["norm2.weight"], p["norm2.bias"], eps=1e-6)
        x = x + F.linear(F.gelu(F.linear(h, p["mlp.fc1.weight"], p["mlp.fc1.bias"])), p["mlp.fc2.weight"], p["mlp.fc2.bias"])
        i += 1
    return F.layer_norm(x, (width,), s["norm.weight"], s["norm.bias"], eps=1e-6)


def test_imagereward_scores_as_its_score_function(imagereward_stand_in):
    from transformers import BertTokenizerFast, CLIPImageProcessor

    folder, bert, state, text, head = imagereward_stand_in
    reward = ranker("imagereward", model=str(folder), processor=str(bert), batch_size=2)
    prompts = ["a red circle", "a blue square above a red circle", "a photo of a red square"]
    batch = [Sample(i, p, noise_image(i, size=20)) for i, p in enumerate(prompts)]
    scores = reward.score(batch)

    # ImageReward.score: Resize(224) + CenterCrop(224) (here the stand-in's 16), CLIP mean/std; BERT tokens padded to 35
    processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}, resample=3)
    pixels = processor(images=[s.output for s in batch], return_tensors="pt")["pixel_values"]
    tokens = BertTokenizerFast.from_pretrained(bert)(prompts, padding="max_length", max_length=35, truncation=True,
                                                     return_tensors="pt")
    with torch.no_grad():
        image = blip_vit_reference(state, pixels, heads=1)
        cls = text(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], encoder_hidden_states=image,
                   encoder_attention_mask=torch.ones(image.shape[:2], dtype=torch.long)).last_hidden_state[:, 0]
        expected = (head(cls).squeeze(-1) - IMAGEREWARD_MEAN) / IMAGEREWARD_STD
    assert len(scores) == 3 and all(np.isfinite(scores))
    assert scores == pytest.approx(expected.tolist(), abs=1e-4)
    assert max(scores) - min(scores) > 1e-3
    # the text encoder attends to the image: the same prompt scores two images differently
    same = reward.score([Sample(0, prompts[0], noise_image(5, 20)), Sample(0, prompts[0], noise_image(6, 20))])
    assert abs(same[0] - same[1]) > 1e-5
    # encoders in bfloat16 (the pipeline's dtype), the head in float32 as ImageReward runs it
    half = build_ranker([DiffusionRankerConfig(kind="imagereward", model=str(folder), processor=str(bert))], CPU, "bfloat16")
    assert half.score(batch) == pytest.approx(scores, abs=0.1)


def test_imagereward_bad_folders_are_one_line(imagereward_stand_in, tmp_path):
    folder, bert, _, _, _ = imagereward_stand_in
    (folder / "med_config.json").unlink()
    with pytest.raises(RaftError, match="rankers.0.model: '.*' has no med_config.json"):
        ranker("imagereward", model=str(folder), processor=str(bert))
    other = tmp_path / "other.pt"
    torch.save({"weight": torch.zeros(2)}, other)
    (tmp_path / "med_config.json").write_text("{}")
    with pytest.raises(RaftError, match="is not an ImageReward checkpoint"):
        ranker("imagereward", model=str(other), processor=str(bert))


# ----------------------------------------------------------------------------------------------
# LAION aesthetic v2: the MLP on L2-normalised CLIP image embeddings


def test_laion_aesthetic_v2_is_the_mlp_on_normalised_clip_embeddings(tiny_clip_dir, tmp_path):
    torch.manual_seed(0)
    head = AestheticMLP(16)
    torch.save(head.state_dict(), tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    aesthetic = ranker("laion-aesthetic-v2", model=str(tiny_clip_dir), weights=str(tmp_path / "sac+logos+ava1-l14-linearMSE.pth"))
    assert aesthetic.name == "laion-aesthetic-v2"
    batch = [Sample(i, "ignored", noise_image(i)) for i in range(3)]
    scores = aesthetic.score(batch)

    from transformers import CLIPImageProcessor, CLIPModel

    model = CLIPModel.from_pretrained(tiny_clip_dir)
    pixels = CLIPImageProcessor.from_pretrained(tiny_clip_dir)(images=[s.output for s in batch], return_tensors="pt")
    with torch.no_grad():
        features = model.get_image_features(**pixels)
        features = features if isinstance(features, torch.Tensor) else features.pooler_output
        expected = head.eval()(features / features.norm(dim=-1, keepdim=True)).squeeze(-1)
    assert scores == pytest.approx(expected.tolist(), abs=1e-5)
    with pytest.raises(RaftError, match="cannot download 'trl-lib/ddpo-aesthetic-predictor/aesthetic-model.pth'"):
        ranker("laion-aesthetic-v2", model=str(tiny_clip_dir))  # the published head by default; the hub is off here


def test_defaults_are_the_published_ids():
    from raft.modalities.diffusion.rankers import PUBLISHED, clip_model_of, processor_of

    assert PUBLISHED["pickscore"] == ("yuvalkirstain/PickScore_v1", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K")
    config = DiffusionRankerConfig(kind="hpsv2")
    assert (clip_model_of(config), processor_of(config)) == ("xswu/HPSv2/HPS_v2_compressed.pt",
                                                              "laion/CLIP-ViT-H-14-laion2B-s32B-b79K")
    assert clip_model_of(DiffusionRankerConfig(kind="imagereward")) == "THUDM/ImageReward"
    assert clip_model_of(DiffusionRankerConfig(kind="laion-aesthetic-v2")) == "openai/clip-vit-large-patch14"


def test_a_diffusion_run_rewarded_by_pickscore_and_laion_aesthetic_v2(tiny_sd_dir, tiny_clip_dir, tmp_path, one_thread):
    """In the loop: the published kinds score a run's images, and the diversity metric embeds with PickScore's CLIP
    (a bare model folder: without its `processor` default applied there, the run would stop)."""
    import raft
    from tiny_diffusion import tiny_diffusion_overrides

    bare = tmp_path / "pickscore"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_clip_dir / name, bare / name)
    torch.save(AestheticMLP(16).state_dict(), tmp_path / "head.pth")
    overrides = [o for o in tiny_diffusion_overrides(tiny_sd_dir, tiny_clip_dir, tmp_path / "run")
                 if not o.startswith(("--modality", "diffusion", "rankers."))]
    overrides += ["iterations=1", f"rankers=[{{kind: pickscore, model: {bare}, processor: {tiny_clip_dir}}}, "
                  f"{{kind: laion-aesthetic-v2, model: {tiny_clip_dir}, weights: {tmp_path / 'head.pth'}, weight: 0.5}}]"]
    run_dir = raft.run(raft.load_config("diffusion", overrides=overrides))
    rows = [json.loads(line) for line in (run_dir / "iterations/iter-0001/samples.jsonl").read_text().splitlines()]
    assert rows and all(set(r["rewards"]) == {"pickscore", "laion-aesthetic-v2"} for r in rows)
    assert all(r["reward"] == pytest.approx(r["rewards"]["pickscore"] + 0.5 * r["rewards"]["laion-aesthetic-v2"], abs=1e-4)
               for r in rows)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(m["eval/diversity"]) for m in metrics if "eval/diversity" in m)
    assert any("eval/diversity" in m for m in metrics)
