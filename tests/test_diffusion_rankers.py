"""Image rankers on tiny CLIP models built from configs: CLIP score, the aesthetic predictor (MLP and linear
heads, weights loaded safely), JPEG (in)compressibility, and their weighted combination."""

import importlib.util

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

pytest.importorskip("diffusers")

from raft.errors import RaftError
from raft.interface import Sample
from raft.modalities.diffusion.clip import load_clip
from raft.modalities.diffusion.config import DiffusionRankerConfig
from raft.modalities.diffusion.rankers import (AestheticMLP, AestheticRanker, ClipScoreRanker, JpegRanker,
                                               build_ranker, load_aesthetic_head)
from raft.rankers import WeightedSum, score_samples


def image(seed, noise=1.0, size=16):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=3)
    pixels = np.clip(base + noise * rng.normal(0, 60, size=(size, size, 3)), 0, 255)
    return Image.fromarray(pixels.astype(np.uint8))


def samples(*prompts):
    return [Sample(prompt_index=i, prompt=p, output=image(i)) for i, p in enumerate(prompts)]


def test_clip_score_is_100_times_cosine(tiny_clip_dir):
    from transformers import CLIPModel, CLIPTokenizer

    batch = samples("a red circle", "a blue square above a red circle", "a red circle")
    ranker = ClipScoreRanker(load_clip(str(tiny_clip_dir)))
    scores = ranker.score(batch)

    model, tokenizer = CLIPModel.from_pretrained(tiny_clip_dir), CLIPTokenizer.from_pretrained(tiny_clip_dir)
    pixels = torch.stack([torch.from_numpy(np.asarray(s.output, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
                          for s in batch])
    with torch.no_grad():
        img = model.get_image_features(pixel_values=pixels)
        txt = model.get_text_features(**tokenizer([s.prompt for s in batch], padding=True, return_tensors="pt"))
    img, txt = (x if isinstance(x, torch.Tensor) else x.pooler_output for x in (img, txt))
    expected = 100 * F.cosine_similarity(img, txt)
    assert scores == pytest.approx(expected.tolist(), abs=1e-3)
    assert all(-100 <= s <= 100 for s in scores)


def test_clip_prompt_template_changes_the_scored_text(tiny_clip_dir):
    batch = samples("red circle")
    plain = ClipScoreRanker(load_clip(str(tiny_clip_dir))).score(batch)
    templated = ClipScoreRanker(load_clip(str(tiny_clip_dir)), "a {prompt} above a blue square").score(batch)
    assert plain != pytest.approx(templated)


def test_pickscore_style_checkpoint_with_a_separate_processor(tiny_clip_dir, tmp_path):
    """PickScore ships a CLIPModel without tokenizer or image processor; `processor` names where they are."""
    import shutil

    bare = tmp_path / "bare-clip"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_clip_dir / name, bare / name)
    with pytest.raises(RaftError, match="cannot load CLIP model"):
        load_clip(str(bare))
    ranker = build_ranker([DiffusionRankerConfig(kind="clip", model=str(bare), processor=str(tiny_clip_dir))],
                          torch.device("cpu"))
    batch = samples("a red circle", "a green square")
    assert ranker.score(batch) == pytest.approx(ClipScoreRanker(load_clip(str(tiny_clip_dir))).score(batch), abs=1e-4)


@pytest.mark.parametrize("kind, suffix", [("mlp", ".pth"), ("mlp", ".safetensors"), ("linear", ".pth")])
def test_aesthetic_head_over_normalised_clip_embeddings(tiny_clip_dir, tmp_path, kind, suffix):
    torch.manual_seed(0)
    head = AestheticMLP(16) if kind == "mlp" else torch.nn.Linear(16, 1)
    path = tmp_path / f"head{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(head.state_dict(), str(path))
    else:
        torch.save(head.state_dict(), path)
    if kind == "mlp":
        assert sorted(head.state_dict())[:2] == ["layers.0.bias", "layers.0.weight"]  # LAION's checkpoint keys
        assert sorted(head.state_dict())[-2:] == ["layers.7.bias", "layers.7.weight"]
    config = DiffusionRankerConfig(kind="aesthetic", model=str(tiny_clip_dir), head=kind, weights=str(path))
    ranker = build_ranker([config], torch.device("cpu"))
    assert isinstance(ranker, AestheticRanker) and ranker.name == "aesthetic"
    batch = samples("a", "b", "c")
    embeddings = load_clip(str(tiny_clip_dir)).embed_images([s.output for s in batch])
    assert embeddings.norm(dim=-1).tolist() == pytest.approx([1.0] * 3)
    with torch.no_grad():
        expected = head.eval()(embeddings).squeeze(-1)
    assert ranker.score(batch) == pytest.approx(expected.tolist(), abs=1e-5)


def test_aesthetic_weights_are_loaded_safely_and_checked(tiny_clip_dir, tmp_path):
    wrong_size = tmp_path / "wrong.pth"
    torch.save(AestheticMLP(768).state_dict(), wrong_size)  # LAION's ViT-L/14 head over a 16-d tiny CLIP
    with pytest.raises(RaftError, match="does not fit the mlp aesthetic head over 16-d CLIP embeddings"):
        load_aesthetic_head(str(wrong_size), "mlp", 16, "rankers.0.weights")

    pickled_module = tmp_path / "module.pth"
    torch.save(AestheticMLP(16), pickled_module)  # a whole pickled module, not a state dict: refused
    with pytest.raises(RaftError, match="cannot read weights"):
        load_aesthetic_head(str(pickled_module), "mlp", 16, "rankers.0.weights")

    with pytest.raises(RaftError, match="no such file"):
        load_aesthetic_head(str(tmp_path / "absent.pth"), "mlp", 16, "rankers.0.weights")
    with pytest.raises(RaftError, match="cannot download 'org/repo/head.pth'"):  # the hub is offline in tests
        load_aesthetic_head("org/repo/head.pth", "mlp", 16, "rankers.0.weights")


def test_jpeg_sizes():
    flat, noisy = image(0, noise=0.0, size=64), image(0, noise=1.0, size=64)
    batch = [Sample(0, "p", flat), Sample(1, "p", noisy)]
    incompressibility = JpegRanker(compressible=False).score(batch)
    compressibility = JpegRanker(compressible=True).score(batch)
    assert incompressibility[1] > 2 * incompressibility[0] > 0
    assert compressibility == [-s for s in incompressibility]


def test_weighted_sum_of_clip_and_jpeg_keeps_each_part(tiny_clip_dir):
    ranker = build_ranker([DiffusionRankerConfig(kind="clip", model=str(tiny_clip_dir), weight=1.0),
                           DiffusionRankerConfig(kind="compressibility", weight=0.5)], torch.device("cpu"))
    assert isinstance(ranker, WeightedSum)
    batch = samples("a red circle", "a blue square")
    score_samples(ranker, batch)
    for s in batch:
        assert set(s.rewards) == {"clip_score", "compressibility"}
        assert s.reward == pytest.approx(s.rewards["clip_score"] + 0.5 * s.rewards["compressibility"])


def test_callable_ranker_gets_prompts_and_images(tmp_path):
    module = tmp_path / "image_rewards.py"
    module.write_text("import numpy as np\n\n"
                      "def brightness(prompts, images):\n"
                      "    return [float(np.asarray(im.convert('L')).mean()) for im in images]\n")
    ranker = build_ranker([DiffusionRankerConfig(kind="callable", function=f"{module}:brightness")], torch.device("cpu"))
    black, white = Image.new("RGB", (8, 8)), Image.new("RGB", (8, 8), (255, 255, 255))
    assert ranker.score([Sample(0, "p", black), Sample(1, "p", white)]) == [0.0, 255.0]


@pytest.mark.skipif(importlib.util.find_spec("open_clip") is not None, reason="open_clip is installed")
def test_open_clip_names_need_open_clip():
    with pytest.raises(RaftError, match="needs open_clip"):
        load_clip("open_clip:ViT-B-32/laion2b_s34b_b79k")


def test_one_clip_copy_serves_the_ranker_and_the_diversity_metric(tiny_clip_dir):
    ranker_copy = load_clip(str(tiny_clip_dir), None, "cpu", "float32", "rankers.0.model")
    assert load_clip(str(tiny_clip_dir), None, "cpu", "float32", "eval.embedding_model") is ranker_copy
    with pytest.raises(RaftError, match="eval.embedding_model: no such folder"):
        load_clip("/absent/clip", None, "cpu", "float32", "eval.embedding_model")
