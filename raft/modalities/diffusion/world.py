"""The shapes world: coloured circles, squares and triangles on black, with compositional captions.

It is what raft's offline diffusion default is trained on and aligned for. Every image is drawn from a
caption and a seed, so the world is its own infinite, labelled data set:

    "a red circle"                                  one object, anywhere
    "a red circle above a blue square"              two objects; relations: above, below,
    "a green triangle to the left of a red square"  to the left of, to the right of

Images are drawn at 4x the size and downsampled, so edges are anti-aliased.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (160, 60, 210),
    "white": (235, 235, 235),
}
SHAPES = ("circle", "square", "triangle")
# relation -> (axis, sign): the first object lies on the `sign` side of the second along `axis` (0: x, 1: y)
RELATIONS: dict[str, tuple[int, int]] = {
    "above": (1, -1),
    "below": (1, 1),
    "to the left of": (0, -1),
    "to the right of": (0, 1),
}
OPPOSITE = {"above": "below", "below": "above", "to the left of": "to the right of", "to the right of": "to the left of"}
SIZE = 32  # pixels
SUPERSAMPLE = 4


@dataclass(frozen=True)
class Thing:
    color: str
    shape: str

    def __str__(self) -> str:
        return f"a {self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """One object, or two objects in a spatial relation."""

    first: Thing
    relation: str | None = None
    second: Thing | None = None

    @property
    def caption(self) -> str:
        if self.relation is None:
            return str(self.first)
        return f"{self.first} {self.relation} {self.second}"


def all_things() -> list[Thing]:
    return [Thing(c, s) for c in COLORS for s in SHAPES]


def single_scenes() -> list[Scene]:
    return [Scene(t) for t in all_things()]


def pair_scenes() -> list[Scene]:
    """Every two different objects in every relation (18 x 17 x 4 = 1224 scenes)."""
    return [Scene(a, r, b) for a, b in itertools.permutations(all_things(), 2) for r in RELATIONS]


def parse(caption: str) -> Scene:
    """The scene a caption describes (ValueError if it is not a caption of this world)."""
    words = caption.strip().lower().removesuffix(".").split()

    def thing(part: list[str]) -> Thing:
        if len(part) != 3 or part[0] not in ("a", "an") or part[1] not in COLORS or part[2] not in SHAPES:
            raise ValueError(f"not a caption of the shapes world: {caption!r}")
        return Thing(part[1], part[2])

    if len(words) == 3:
        return Scene(thing(words))
    for relation in RELATIONS:
        r = relation.split()
        for start in range(3, len(words)):
            if words[start : start + len(r)] == r:
                return Scene(thing(words[:start]), relation, thing(words[start + len(r) :]))
    raise ValueError(f"not a caption of the shapes world: {caption!r}")


def vocabulary() -> list[str]:
    """Every word a caption of this world may use."""
    words = {"a", "an", *COLORS, *SHAPES}
    for relation in RELATIONS:
        words.update(relation.split())
    return sorted(words)


# ----------------------------------------------------------------------------------------------
# drawing


def draw(scene: Scene, rng: np.random.Generator, size: int = SIZE) -> Image.Image:
    """A random image of `scene`: positions and sizes are drawn from `rng`."""
    scale = size / SIZE
    canvas = Image.new("RGB", (size * SUPERSAMPLE, size * SUPERSAMPLE), (0, 0, 0))
    pen = ImageDraw.Draw(canvas)
    if scene.relation is None:
        extent = rng.uniform(10, 18)
        center = rng.uniform(extent / 2 + 2, SIZE - extent / 2 - 2, size=2)
        _shape(pen, scene.first, center * scale, extent * scale)
    else:
        axis, sign = RELATIONS[scene.relation]
        extents = rng.uniform(8, 11, size=2)
        near, far = rng.uniform(6.5, 10.5), rng.uniform(SIZE - 10.5, SIZE - 6.5)  # along the axis: >= 11 px apart
        centers = np.empty((2, 2))
        centers[:, 1 - axis] = rng.uniform(7, SIZE - 7, size=2)  # across the axis: anywhere
        centers[:, axis] = (near, far) if sign < 0 else (far, near)
        _shape(pen, scene.first, centers[0] * scale, extents[0] * scale)
        _shape(pen, scene.second, centers[1] * scale, extents[1] * scale)
    return canvas.resize((size, size), Image.Resampling.LANCZOS)


def _shape(pen: ImageDraw.ImageDraw, thing: Thing, center: np.ndarray, extent: float, fill=None) -> None:
    """`thing` at `center` (pixels) on a SUPERSAMPLE x canvas, in its colour or in `fill`."""
    x, y = center * SUPERSAMPLE
    h = extent * SUPERSAMPLE / 2
    color = COLORS[thing.color] if fill is None else fill
    if thing.shape == "circle":
        pen.ellipse([x - h, y - h, x + h, y + h], fill=color)
    elif thing.shape == "square":
        h *= 0.9  # a square of the same extent looks bigger than a circle
        pen.rectangle([x - h, y - h, x + h, y + h], fill=color)
    else:
        pen.polygon([(x, y - h), (x + h * 1.1, y + h * 0.85), (x - h * 1.1, y + h * 0.85)], fill=color)


def random_scene(rng: np.random.Generator, pair_share: float = 0.75) -> Scene:
    things = all_things()
    if rng.random() >= pair_share:
        return Scene(things[rng.integers(len(things))])
    a, b = rng.choice(len(things), size=2, replace=False)
    relation = list(RELATIONS)[rng.integers(len(RELATIONS))]
    return Scene(things[a], relation, things[b])


def hard_negatives(scene: Scene, rng: np.random.Generator) -> list[str]:
    """Captions that differ from the scene's in one respect: colour, shape, relation or binding.

    A contrastive model trained against these cannot score a caption by its bag of words alone."""

    def recolor(thing: Thing) -> Thing:
        return Thing(str(rng.choice([c for c in COLORS if c != thing.color])), thing.shape)

    def reshape(thing: Thing) -> Thing:
        return Thing(thing.color, str(rng.choice([s for s in SHAPES if s != thing.shape])))

    if scene.relation is None:
        return [Scene(recolor(scene.first)).caption, Scene(reshape(scene.first)).caption]
    a, r, b = scene.first, scene.relation, scene.second
    negatives = [
        Scene(a, OPPOSITE[r], b).caption,  # wrong relation
        Scene(b, r, a).caption,  # objects swapped
        Scene(recolor(a), r, b).caption if rng.random() < 0.5 else Scene(a, r, recolor(b)).caption,
        Scene(reshape(a), r, b).caption if rng.random() < 0.5 else Scene(a, r, reshape(b)).caption,
    ]
    if a.color != b.color and a.shape != b.shape:  # colours bound to the wrong shapes
        negatives.append(Scene(Thing(b.color, a.shape), r, Thing(a.color, b.shape)).caption)
    return negatives


def images_to_array(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images])


# ----------------------------------------------------------------------------------------------
# prompts for RAFT


def alignment_prompts(eval_size: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """(training prompts, held-out prompts): all two-object captions, `eval_size` of them held out.

    Scenes described twice ("a above b" and "b below a") land on the same side of the split."""
    scenes = pair_scenes()
    canonical = sorted({_canonical(s) for s in scenes})
    order = np.random.default_rng(seed).permutation(len(canonical))
    held = {canonical[i] for i in order[: max(0, eval_size)]}
    train = [s.caption for s in scenes if _canonical(s) not in held]
    held_out = [s.caption for s in scenes if _canonical(s) in held and s.relation in ("above", "to the left of")]
    rng = np.random.default_rng(seed + 1)
    return train, [held_out[i] for i in rng.permutation(len(held_out))][:eval_size]


def _canonical(scene: Scene) -> tuple:
    if scene.relation in ("below", "to the right of"):
        return (str(scene.second), OPPOSITE[scene.relation], str(scene.first))
    return (str(scene.first), scene.relation, str(scene.second))


# ----------------------------------------------------------------------------------------------
# tokenizer


def build_clip_tokenizer(directory: Path, words: list[str] | None = None, max_length: int = 16):
    """A CLIPTokenizer whose BPE vocabulary holds every word of this world as one token.

    Saved as tokenizer.json (transformers 5) and vocab.json + merges.txt (transformers 4 and the original
    CLIP format), so `CLIPTokenizer.from_pretrained(directory)` loads it everywhere."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    words = words or vocabulary()
    specials = ["<|startoftext|>", "<|endoftext|>"]
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    alphabet = sorted(set("".join(words)) | set("abcdefghijklmnopqrstuvwxyz"))
    trainer = trainers.BpeTrainer(vocab_size=4096, special_tokens=specials, end_of_word_suffix="</w>",
                                  initial_alphabet=alphabet, show_progress=False)
    bpe.train_from_iterator([" ".join(words)] * 4, trainer)
    state = json.loads(bpe.to_str())["model"]
    vocab = state["vocab"]
    for char in alphabet:  # lone letters at a word's end, so unseen words still tokenize
        vocab.setdefault(f"{char}</w>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(directory)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return CLIPTokenizer.from_pretrained(directory)


# ----------------------------------------------------------------------------------------------
# checking an image against its caption, by rule (GenEval's idea for this world)


@dataclass(frozen=True)
class Found:
    """One object found in an image: its colour, shape ("unknown" when no outline of the world fits it), size in
    pixels, centre (x, y), and how well its shape's outline fits it (soft intersection over union, 0-1)."""

    color: str
    shape: str
    area: int
    center: tuple[float, float]
    fit: float


@dataclass(frozen=True)
class Check:
    """What an image shows against its caption. `exact`: exactly the caption's objects (colour and shape), nothing
    else, in the caption's relation."""

    found: tuple[Found, ...]
    count: bool  # as many objects as the caption names
    objects: bool  # each named object is there, colour and shape, as a separate object
    relation: bool  # and they stand in the named relation (True for one-object captions once found)

    @property
    def exact(self) -> bool:
        return self.count and self.objects and self.relation


MIN_AREA = 10  # pixels: smaller specks of one colour are not objects
MIN_COVER = 0.4  # a pixel belongs to a colour's object if it holds at least this much of it over black
MAX_ANGLE = 0.22  # and lies this close to that colour's direction in RGB (distance off it over its own length)
MIN_FIT = 0.7  # a region no outline fits this well is no shape of the world (drawn ones fit 0.87-1.0)


def coverage(image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """(colour index per pixel, -1 for background; how much of that colour the pixel holds, 0-1): each pixel is
    read as c x colour over black, as the world draws anti-aliased edges, with the colour whose direction in RGB
    it is closest to (so a generated colour a little brighter, darker or paler than the world's still counts)."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    palette = np.array(list(COLORS.values()), dtype=np.float32)
    cover = (pixels @ palette.T) / (palette**2).sum(-1)  # least squares c per colour
    off = np.linalg.norm(pixels[:, :, None, :] - cover[..., None] * palette[None, None], axis=-1)
    off = off / np.maximum(np.linalg.norm(pixels, axis=-1, keepdims=True), 1.0)
    best = off.argmin(-1)
    amount = np.take_along_axis(cover, best[..., None], -1)[..., 0]
    label = np.where((amount >= MIN_COVER) & (off.min(-1) <= MAX_ANGLE), best, -1)
    return label, np.where(label >= 0, np.minimum(amount, 1.0), 0.0)


def shape_template(shape: str, center: tuple[float, float], area: float, size: int) -> np.ndarray:
    """How much of each pixel a `shape` of `area` pixels centred (centroid) at `center` covers, drawn as draw()
    draws it."""
    if shape == "circle":
        extent = 2 * np.sqrt(area / np.pi)
    elif shape == "square":
        extent = np.sqrt(area) / 0.9
    else:  # triangle: base 2.2 h, height 1.85 h (h = extent / 2), centroid 0.2333 h below the drawn centre
        extent = 2 * np.sqrt(area / 2.035)
    x, y = center
    if shape == "triangle":
        y -= 0.2333 * extent / 2
    canvas = Image.new("L", (size * SUPERSAMPLE, size * SUPERSAMPLE), 0)
    # the world's own pen; pixel i spans [i, i + 1), so a centroid at pixel x is a drawn centre at x + 0.5
    _shape(ImageDraw.Draw(canvas), Thing("white", shape), np.array([x + 0.5, y + 0.5]), extent, fill=255)
    return np.asarray(canvas.resize((size, size), Image.Resampling.BOX), dtype=np.float32) / 255.0


def find_objects(image: Image.Image) -> list[Found]:
    """The objects of an image: 4-connected regions of one of the world's colours, at least MIN_AREA pixels each.
    A region's shape is the one of the world's three whose outline, drawn at the region's centre and area, overlaps
    its coverage best (soft intersection over union), if that overlap reaches MIN_FIT."""
    label, amount = coverage(image)
    names = list(COLORS)
    height, width = label.shape
    seen = np.zeros_like(label, dtype=bool)
    found = []
    for y0 in range(height):
        for x0 in range(width):
            if label[y0, x0] < 0 or seen[y0, x0]:
                continue
            color, stack, region = label[y0, x0], [(y0, x0)], []
            seen[y0, x0] = True
            while stack:
                y, x = stack.pop()
                region.append((y, x))
                for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                    if 0 <= ny < height and 0 <= nx < width and not seen[ny, nx] and label[ny, nx] == color:
                        seen[ny, nx] = True
                        stack.append((ny, nx))
            if len(region) < MIN_AREA:
                continue
            ys, xs = np.array(region).T
            mine = np.zeros((height, width), dtype=np.float32)
            mine[ys, xs] = amount[ys, xs]
            area = float(mine.sum())
            center = (float((mine.sum(0) * np.arange(width)).sum() / area), float((mine.sum(1) * np.arange(height)).sum() / area))
            fits = {shape: np.minimum(mine, t).sum() / np.maximum(mine, t).sum()
                    for shape in SHAPES for t in [shape_template(shape, center, area, width)]}
            shape = max(fits, key=fits.get)
            fit = float(fits[shape])
            found.append(Found(names[color], shape if fit >= MIN_FIT else "unknown", len(region), center, fit))
    return found


def check(image: Image.Image, caption: str) -> Check:
    """`image` against `caption` (a caption of this world), by the rules of find_objects."""
    scene = parse(caption)
    found = find_objects(image)
    wanted = [scene.first] if scene.relation is None else [scene.first, scene.second]
    matches = []
    for thing in wanted:
        match = next((i for i, f in enumerate(found) if (f.color, f.shape) == (thing.color, thing.shape)
                      and i not in matches), None)
        matches.append(match)
    objects = all(m is not None for m in matches)
    relation = objects
    if objects and scene.relation is not None:
        axis, sign = RELATIONS[scene.relation]
        first, second = (found[m].center for m in matches)
        relation = sign * (first[axis] - second[axis]) > 1.0
    return Check(tuple(found), len(found) == len(wanted), objects, relation)


def composition_reward(prompts: list[str], images: list[Image.Image]) -> list[float]:
    """A verifiable reward for the shapes world, by world.check: 1 for an exact image; otherwise partial credit, so
    that best-of-K has something to rank when exact images are rare: per named object 0.25 (0.1 if only its
    colour is some object's), 0.25 for as many objects as named, 0.25 for the relation once the objects are there,
    over the most those parts give (1 for two-object captions).
    Use it as a callable ranker: `rankers: [{kind: callable, function: raft.modalities.diffusion.world:composition_reward}]`."""
    scores = []
    for prompt, image in zip(prompts, images):
        scene, result = parse(prompt), check(image, prompt)
        wanted = [scene.first] if scene.relation is None else [scene.first, scene.second]
        things = {(f.color, f.shape) for f in result.found}
        colours = {f.color for f in result.found}
        score = sum(0.25 if (t.color, t.shape) in things else 0.1 if t.color in colours else 0.0 for t in wanted)
        score += 0.25 * result.count + 0.25 * (result.objects and result.relation)
        scores.append(1.0 if result.exact else score / (0.25 * len(wanted) + 0.5))  # all parts right: 1
    return scores
