"""The shapes world: captions parse back, images follow their captions, the held-out split is clean."""

import numpy as np
import pytest

from raft.modalities.diffusion import world


def test_every_caption_parses_back_to_its_scene():
    for scene in world.single_scenes() + world.pair_scenes():
        assert world.parse(scene.caption) == scene
    assert len(world.pair_scenes()) == 18 * 17 * 4
    with pytest.raises(ValueError):
        world.parse("a red dragon above a blue square")


def test_drawing_is_seeded_and_puts_colours_where_the_caption_says():
    scene = world.parse("a red square above a blue circle")
    one = np.asarray(world.draw(scene, np.random.default_rng(3)))
    two = np.asarray(world.draw(scene, np.random.default_rng(3)))
    assert one.shape == (32, 32, 3) and (one == two).all()
    for seed in range(20):
        image = np.asarray(world.draw(scene, np.random.default_rng(seed))).astype(int)
        red = (image[..., 0] > 150) & (image[..., 1] < 100) & (image[..., 2] < 100)
        blue = (image[..., 2] > 150) & (image[..., 0] < 100)
        assert red.sum() > 20 and blue.sum() > 20
        assert np.nonzero(red)[0].mean() < np.nonzero(blue)[0].mean()  # red is higher up (smaller row index)


def test_hard_negatives_differ_from_the_caption():
    rng = np.random.default_rng(0)
    for scene in world.pair_scenes()[::37]:
        negatives = world.hard_negatives(scene, rng)
        assert len(negatives) >= 4 and scene.caption not in negatives
        equivalent = world.Scene(scene.second, world.OPPOSITE[scene.relation], scene.first).caption
        assert equivalent not in negatives  # "b below a" says the same as "a above b"


def test_held_out_scenes_never_appear_in_training_prompts_in_any_wording():
    train, held_out = world.alignment_prompts(eval_size=32)
    assert len(held_out) == 32 and len(set(held_out)) == 32
    train = set(train)
    for caption in held_out:
        scene = world.parse(caption)
        assert caption not in train
        assert world.Scene(scene.second, world.OPPOSITE[scene.relation], scene.first).caption not in train
    assert len(train) == 18 * 17 * 4 - 2 * 32


def test_tokenizer_keeps_every_word_whole(tmp_path):
    tokenizer = world.build_clip_tokenizer(tmp_path / "tok")
    ids = tokenizer("a purple triangle to the right of a white square").input_ids
    assert len(ids) == 2 + 10  # start, ten words, end
    assert tokenizer.convert_ids_to_tokens(ids[1:-1])[2] == "triangle</w>"
    assert (tmp_path / "tok" / "vocab.json").is_file() and (tmp_path / "tok" / "merges.txt").is_file()


def test_the_rule_check_passes_every_true_image_and_fails_wrong_captions_and_colour_fields():
    """world.check, the rule-based judge of benchmarks/diffusion_composition.py: every drawn image passes against
    its own caption; against each of its hard negatives (wrong colour, shape, relation, swapped objects or binding)
    it fails; a frame filled with the caption's colours, which a learned judge may score high, fails too."""
    from PIL import Image

    rng = np.random.default_rng(11)
    scenes = [world.random_scene(rng, 1.0) for _ in range(150)] + [world.random_scene(rng, 0.0) for _ in range(50)]
    negatives = failed = 0
    for scene in scenes:
        image = world.draw(scene, rng)
        result = world.check(image, scene.caption)
        assert result.exact, (scene.caption, result.found)
        for negative in world.hard_negatives(scene, rng):
            negatives += 1
            failed += not world.check(image, negative).exact
    assert failed == negatives
    scene = world.parse("a red circle above a blue square")
    field = np.zeros((32, 32, 3), np.uint8)
    field[:16], field[16:] = world.COLORS["red"], world.COLORS["blue"]
    result = world.check(Image.fromarray(field), scene.caption)
    assert {(f.color, f.shape) for f in result.found} == {("red", "unknown"), ("blue", "unknown")}
    assert not result.exact
    assert world.check(Image.new("RGB", (32, 32)), scene.caption).found == ()


def test_composition_reward_is_one_for_the_caption_and_less_the_more_is_wrong():
    scene = world.parse("a red circle above a blue square")
    image = world.draw(scene, np.random.default_rng(0))
    captions = [scene.caption, "a blue square above a red circle", "a red square above a blue square",
                "a green triangle above a yellow circle", "a red circle"]
    right, relation, shape, nothing, single = world.composition_reward(captions, [image] * len(captions))
    assert right == 1.0 and 1.0 > relation > shape > nothing >= 0.0 and 0.0 < single < 1.0
