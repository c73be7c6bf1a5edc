"""Prompts and held-out prompts: the shapes world's captions, CIFAR class names, or the user's files."""

from __future__ import annotations

from dataclasses import dataclass

from raft.data import SPLIT_SEED, read_column, split_held_out
from raft.modalities.diffusion import world
from raft.modalities.diffusion.config import DiffusionDataConfig

CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR100 = [
    "apple", "aquarium fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle", "bowl", "boy",
    "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle", "chair", "chimpanzee", "clock",
    "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish",
    "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple tree", "motorcycle", "mountain", "mouse", "mushroom", "oak tree", "orange",
    "orchid", "otter", "palm tree", "pear", "pickup truck", "pine tree", "plain", "plate", "poppy", "porcupine",
    "possum", "rabbit", "raccoon", "ray", "road", "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk",
    "skyscraper", "snail", "snake", "spider", "squirrel", "streetcar", "sunflower", "sweet pepper", "table", "tank",
    "telephone", "television", "tiger", "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale",
    "willow tree", "wolf", "woman", "worm",
]
BUILTIN_LISTS = {"cifar10": CIFAR10, "cifar100": CIFAR100}


@dataclass
class DiffusionData:
    prompts: list[str]
    eval_prompts: list[str]


def load_prompts(config: DiffusionDataConfig) -> DiffusionData:
    if config.prompts == "shapes":
        prompts, eval_prompts = world.alignment_prompts(config.eval_size, seed=SPLIT_SEED)
    else:
        prompts = read_list(config.prompts, config.prompt_field, "data.prompts")
        eval_prompts = None
        if not config.eval_prompts:
            prompts, eval_prompts = split_held_out(prompts, config.eval_size, config.prompts)
    if config.eval_prompts:
        eval_prompts = read_list(config.eval_prompts, config.prompt_field, "data.eval_prompts")
    template = config.prompt_template
    return DiffusionData([template.replace("{prompt}", p) for p in prompts],
                         [template.replace("{prompt}", p) for p in eval_prompts[: config.eval_size]])


def read_list(name: str, column: str, field: str) -> list[str]:
    if name in BUILTIN_LISTS:
        return list(BUILTIN_LISTS[name])
    if name == "shapes":
        train, held_out = world.alignment_prompts(0)
        return train
    return read_column(name, column, field)
