"""The synthetic "shapes" world: scenes, captions, exact rendering, and fixed evaluation prompt sets.

A scene is 1-3 flat-coloured circles, squares and triangles on a light background, with a caption made
only of :mod:`attnctl.toyworld.vocab` words. Boxes live on a 32-unit grid, so at 32 or 64 pixels every
edge falls on a pixel boundary and :mod:`attnctl.toyworld.evaluate` can recover them exactly.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from attnctl.errors import AttnCtlError
from attnctl.toyworld import vocab

GRID = 32
"""Boxes are placed in units of 1/GRID of the image; resolutions that are multiples of GRID render exactly."""

SIZE_UNITS: dict[str, int] = {"small": 9, "large": 13}
"""Side of an object's (square) box in grid units: 9 and 13 px at 32 px, 18 and 26 px at 64 px."""

MARGIN = 1
"""Minimum distance, in grid units, between an object and the image border."""

GAP = 1
"""Minimum distance, in grid units, between two objects' boxes (keeps same-colour objects apart)."""

KINDS: tuple[str, ...] = ("single", "pair", "triple", "position", "relation", "count")

KIND_WEIGHTS: dict[str, float] = {
    "single": 0.30,
    "pair": 0.15,
    "triple": 0.10,
    "position": 0.15,
    "relation": 0.15,
    "count": 0.15,
}
"""Training mix of :func:`sample_scene`; single objects are common so shapes and colours are learnt well."""

POSITIONS: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
}
"""Absolute position -> caption phrase."""

RELATIONS: dict[str, str] = {
    "left": "to the left of",
    "right": "to the right of",
    "above": "above",
    "below": "below",
}
"""Relation of the first object to the second -> caption phrase."""

POSITION_EXTENT = 0.35
"""A positioned object's box centre lies within this fraction of the image from its side."""

RELATION_MIN_OFFSET = 0.25
"""Generated relations: centres at least this far apart along the relation's axis ..."""

RELATION_DOMINANCE = 0.08
"""... and the offset along that axis beats the other axis' offset by at least this much."""

SIZE_WORD_PROB = 0.3
"""How often a training caption names an object's size."""

_PLACEMENT_TRIES = 200


@dataclass(frozen=True)
class WorldObject:
    """One object of a scene: shape, colour, box (x0, y0, x1, y1 as image fractions) and size class."""

    shape: str
    colour: str
    box: tuple[float, float, float, float]
    size: str


def _box(values: Any) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = (float(v) for v in values)
    return x0, y0, x1, y1


@dataclass(frozen=True)
class Scene:
    """A caption, the objects it describes (in caption order), and the template family that made it."""

    caption: str
    objects: tuple[WorldObject, ...]
    kind: str

    def to_json(self) -> dict:
        """A JSON-ready dict; :meth:`from_json` inverts it."""
        return {
            "caption": self.caption,
            "kind": self.kind,
            "objects": [
                {"shape": o.shape, "colour": o.colour, "box": list(o.box), "size": o.size}
                for o in self.objects
            ],
        }

    @classmethod
    def from_json(cls, d: dict) -> Scene:
        """Rebuild a scene from :meth:`to_json` output."""
        objects = tuple(WorldObject(o["shape"], o["colour"], _box(o["box"]), o["size"]) for o in d["objects"])
        return cls(caption=d["caption"], objects=objects, kind=d["kind"])


@dataclass(frozen=True)
class _Spec:
    """One noun phrase of a caption: `count` objects of one shape and colour, maybe with size/position."""

    shape: str
    colour: str
    count: int = 1
    size: str | None = None
    position: str | None = None


# --------------------------------------------------------------------------------------------- captions


def _phrase(spec: _Spec) -> str:
    """The noun phrase for a spec, e.g. "two green triangles" or "a small red circle on the left"."""
    words = [vocab.COUNT_WORDS[spec.count]]
    if spec.size is not None:
        words.append(spec.size)
    words.append(spec.colour)
    words.append(vocab.PLURALS[spec.shape] if spec.count > 1 else spec.shape)
    if words[0] == "a" and words[1][0] in "aeiou":
        words[0] = "an"
    if spec.position is not None:
        words.append(POSITIONS[spec.position])
    return " ".join(words)


def _caption(specs: list[_Spec], relation: str | None = None) -> str:
    """Join phrases with "and", or with a relation phrase when `relation` is given (two specs)."""
    if relation is not None:
        return f"{_phrase(specs[0])} {RELATIONS[relation]} {_phrase(specs[1])}"
    return " and ".join(_phrase(s) for s in specs)


def caption_words(caption: str) -> list[str]:
    """The words of a caption as the toy tokenizer splits them (lower-cased, every punctuation mark a word of its
    own), so the checks here name the same unknown words as the pipeline's vocabulary check ("." in "a circle.")."""
    from attnctl.toyworld.tokenizer import split_words

    return split_words(caption)


def check_words(caption: str) -> None:
    """Raise AttnCtlError (a ValueError) naming any words of `caption` the world's vocabulary lacks."""
    known = set(vocab.words())
    unknown = list(dict.fromkeys(w for w in caption_words(caption) if w not in known))
    if unknown:
        raise AttnCtlError(
            f"words outside the shapes world's vocabulary: {', '.join(repr(w) for w in unknown)}",
            f"use only the words the world knows: {' '.join(vocab.words())}",
        )


def parse_caption(caption: str) -> dict[str, Any]:
    """Parse a world caption into ``{"objects": [...], "relation": {...}?}`` (the prompt-item fields).

    Each object is ``{"shape", "colour", "count", "size"?, "position"?}``; a relation is
    ``{"subject": 0, "relation": "left"|"right"|"above"|"below", "object": 1}``. Raises ValueError for
    words outside the vocabulary or captions the world's grammar does not produce.
    """
    check_words(caption)
    tokens = caption_words(caption)
    if not tokens:
        return {"objects": []}
    specs: list[dict[str, Any]] = []
    relation: str | None = None
    i = 0
    while True:
        spec, i = _parse_phrase(tokens, i, caption)
        specs.append(spec)
        if i == len(tokens):
            break
        if tokens[i] in ("and", ",") and relation is None:
            i += 2 if tokens[i : i + 2] == [",", "and"] else 1
            continue
        rel, i = _parse_relation(tokens, i, caption)
        if rel is None or relation is not None or len(specs) != 1:
            raise ValueError(f"cannot parse {caption!r} near word {i}: {' '.join(tokens[i:])!r}")
        relation = rel
    out: dict[str, Any] = {"objects": specs}
    if relation is not None:
        if len(specs) != 2:
            raise ValueError(f"a relation must join exactly two phrases: {caption!r}")
        out["relation"] = {"subject": 0, "relation": relation, "object": 1}
    return out


_COUNT_OF = {"a": 1, "an": 1, **{w: n for n, w in vocab.COUNT_WORDS.items()}}
_SINGULAR_OF = {**{s: s for s in vocab.SHAPES}, **{p: s for s, p in vocab.PLURALS.items()}}


def _parse_phrase(tokens: list[str], i: int, caption: str) -> tuple[dict[str, Any], int]:
    """Parse ``count [size] colour shape [position]`` starting at token i."""

    def fail() -> ValueError:
        return ValueError(f"cannot parse {caption!r} near word {i}: {' '.join(tokens[i:])!r}")

    if i >= len(tokens) or tokens[i] not in _COUNT_OF:
        raise fail()
    spec: dict[str, Any] = {"count": _COUNT_OF[tokens[i]]}
    j = i + 1
    if j < len(tokens) and tokens[j] in vocab.SIZE_WORDS:
        spec["size"] = tokens[j]
        j += 1
    if j >= len(tokens) or tokens[j] not in vocab.COLOURS:
        raise fail()
    spec["colour"] = tokens[j]
    j += 1
    if j >= len(tokens) or tokens[j] not in _SINGULAR_OF:
        raise fail()
    plural = tokens[j] != _SINGULAR_OF[tokens[j]]
    if plural != (spec["count"] > 1):
        raise fail()
    spec["shape"] = _SINGULAR_OF[tokens[j]]
    j += 1
    for name, phrase in POSITIONS.items():
        words = phrase.split()
        if tokens[j : j + len(words)] == words:
            spec["position"] = name
            j += len(words)
            break
    ordered = {k: spec[k] for k in ("shape", "colour", "count", "size", "position") if k in spec}
    return ordered, j


def _parse_relation(tokens: list[str], i: int, caption: str) -> tuple[str | None, int]:
    """Parse a relation phrase at token i; (None, i) if there is none."""
    for name, phrase in RELATIONS.items():
        words = phrase.split()
        if tokens[i : i + len(words)] == words:
            return name, i + len(words)
    return None, i


# --------------------------------------------------------------------------------------------- layout

Box = tuple[int, int, int]  # x0, y0, side in grid units


def _axis_range(side: int, region: str | None, low: str, high: str) -> tuple[int, int]:
    """Inclusive range of the box start along one axis, honouring a position constraint on that axis."""
    lo, hi = MARGIN, GRID - MARGIN - side
    extent = POSITION_EXTENT * GRID
    if region == low:
        hi = min(hi, int(np.floor(extent - side / 2)))
    elif region == high:
        lo = max(lo, int(np.ceil(GRID - extent - side / 2)))
    return lo, hi


def _sample_box(rng: np.random.Generator, side: int, position: str | None) -> Box:
    """A random box of the given side, inside the margin and inside the region a position word names."""
    xlo, xhi = _axis_range(side, position, "left", "right")
    ylo, yhi = _axis_range(side, position, "top", "bottom")
    return int(rng.integers(xlo, xhi + 1)), int(rng.integers(ylo, yhi + 1)), side


def _apart(a: Box, b: Box) -> bool:
    """True if the boxes are separated by at least GAP units along some axis."""
    return (
        a[0] + a[2] + GAP <= b[0]
        or b[0] + b[2] + GAP <= a[0]
        or a[1] + a[2] + GAP <= b[1]
        or b[1] + b[2] + GAP <= a[1]
    )


def _centre(b: Box) -> tuple[float, float]:
    return (b[0] + b[2] / 2) / GRID, (b[1] + b[2] / 2) / GRID


def relation_offsets(
    relation: str, subject: tuple[float, float], obj: tuple[float, float]
) -> tuple[float, float]:
    """(offset along the relation's axis in its direction, offset along the other axis) between centres.

    Positive first value means the relation holds in direction; e.g. for "left" it is obj_x - subject_x.
    """
    dx, dy = obj[0] - subject[0], obj[1] - subject[1]
    return {"left": (dx, abs(dy)), "right": (-dx, abs(dy)), "above": (dy, abs(dx)), "below": (-dy, abs(dx))}[
        relation
    ]


def _relation_holds_strongly(relation: str, a: Box, b: Box) -> bool:
    """The generator's (stricter than the evaluator's) test that box a is `relation` of box b."""
    along, across = relation_offsets(relation, _centre(a), _centre(b))
    return along >= RELATION_MIN_OFFSET and along >= across + RELATION_DOMINANCE


def _place(
    rng: np.random.Generator, sides: list[int], positions: list[str | None], relation: str | None
) -> list[Box] | None:
    """Rejection-sample non-overlapping boxes; None if no layout was found within the try budget."""
    for _ in range(_PLACEMENT_TRIES):
        boxes: list[Box] = []
        for side, pos in zip(sides, positions, strict=True):
            box = _sample_box(rng, side, pos)
            if not all(_apart(box, other) for other in boxes):
                break
            boxes.append(box)
        else:
            if relation is None or _relation_holds_strongly(relation, boxes[0], boxes[1]):
                return boxes
    return None


def _build_scene(
    rng: np.random.Generator, specs: list[_Spec], kind: str, relation: str | None = None
) -> Scene:
    """Lay out the objects of `specs` (random sizes unless named) and caption them."""
    sizes = [s.size for s in specs for _ in range(s.count)]
    positions = [s.position for s in specs for _ in range(s.count)]
    while True:
        drawn = [sz or vocab.SIZE_WORDS[int(rng.integers(2))] for sz in sizes]
        boxes = _place(rng, [SIZE_UNITS[sz] for sz in drawn], positions, relation)
        if boxes is not None:
            break
    shapes = [(s.shape, s.colour) for s in specs for _ in range(s.count)]
    objects = tuple(
        WorldObject(shape, colour, (x / GRID, y / GRID, (x + side) / GRID, (y + side) / GRID), size)
        for (shape, colour), (x, y, side), size in zip(shapes, boxes, drawn, strict=True)
    )
    return Scene(caption=_caption(specs, relation), objects=objects, kind=kind)


# --------------------------------------------------------------------------------------------- sampling


def _pick(rng: np.random.Generator, seq: tuple | list) -> Any:
    return seq[int(rng.integers(len(seq)))]


def _colours(rng: np.random.Generator, k: int) -> list[str]:
    """k distinct colours."""
    names = list(vocab.COLOURS)
    return [names[i] for i in rng.permutation(len(names))[:k]]


def _size_word(rng: np.random.Generator, prob: float) -> str | None:
    return _pick(rng, vocab.SIZE_WORDS) if rng.random() < prob else None


def _random_spec(
    rng: np.random.Generator, colour: str, size_prob: float, position: str | None = None
) -> _Spec:
    """One object of a random shape in the given colour, naming its size with probability size_prob."""
    return _Spec(_pick(rng, vocab.SHAPES), colour, size=_size_word(rng, size_prob), position=position)


def _specs_for(rng: np.random.Generator, kind: str, size_prob: float) -> tuple[list[_Spec], str | None]:
    """The noun phrases (and relation, if any) of a random scene of the given kind."""
    if kind in ("single", "pair", "triple"):
        k = {"single": 1, "pair": 2, "triple": 3}[kind]
        return [_random_spec(rng, c, size_prob) for c in _colours(rng, k)], None
    if kind == "position":
        if rng.random() < 0.5:
            places = [_pick(rng, tuple(POSITIONS))]
        else:
            places = list(_pick(rng, (("left", "right"), ("top", "bottom"))))
            rng.shuffle(places)
        colours = _colours(rng, len(places))
        return [_random_spec(rng, c, size_prob, p) for c, p in zip(colours, places, strict=True)], None
    if kind == "relation":
        return [_random_spec(rng, c, size_prob) for c in _colours(rng, 2)], _pick(rng, tuple(RELATIONS))
    if kind == "count":
        many = int(rng.integers(2, 4))
        colours = _colours(rng, 2)
        specs = [_Spec(_pick(rng, vocab.SHAPES), colours[0], count=many)]
        if many == 2 and rng.random() < 0.5:
            specs.append(_Spec(_pick(rng, vocab.SHAPES), colours[1]))
            if rng.random() < 0.5:
                specs.reverse()
        return specs, None
    raise ValueError(f"unknown scene kind {kind!r}; known kinds: {', '.join(KINDS)}")


def _sample(rng: np.random.Generator, kind: str | None, size_prob: float) -> Scene:
    if kind is None:
        kind = str(rng.choice(list(KIND_WEIGHTS), p=np.array(list(KIND_WEIGHTS.values()))))
    specs, relation = _specs_for(rng, kind, size_prob)
    return _build_scene(rng, specs, kind, relation)


def sample_scene(rng: np.random.Generator, kind: str | None = None) -> Scene:
    """A random scene of the given kind (one of :data:`KINDS`), or of the training mix when kind is None."""
    return _sample(rng, kind, SIZE_WORD_PROB)


# --------------------------------------------------------------------------------------------- rendering


@functools.lru_cache(maxsize=256)
def shape_mask(shape: str, height: int, width: int) -> np.ndarray:
    """Boolean mask of a shape filling a height x width box (pixel centres inside the shape).

    Circles are the inscribed ellipse, squares fill the box, triangles point up with a full-width base.
    Every mask touches all four sides of its box, so its bounding box is the box itself.
    """
    ys = (np.arange(height) + 0.5)[:, None]
    xs = (np.arange(width) + 0.5)[None, :]
    if shape == "square":
        mask = np.ones((height, width), dtype=bool)
    elif shape == "circle":
        mask = ((xs - width / 2) / (width / 2)) ** 2 + ((ys - height / 2) / (height / 2)) ** 2 <= 1 + 1e-9
    elif shape == "triangle":
        half = (width / 2) * (np.arange(1, height + 1)[:, None] / height)
        mask = np.abs(xs - width / 2) <= half + 1e-9
    else:
        raise ValueError(f"unknown shape {shape!r}; known shapes: {', '.join(vocab.SHAPES)}")
    mask.setflags(write=False)
    return mask


def pixel_box(box: tuple[float, float, float, float], resolution: int) -> tuple[int, int, int, int]:
    """A fractional box in whole pixels (x0, y0, x1, y1), x1/y1 exclusive."""
    x0, y0, x1, y1 = (int(round(v * resolution)) for v in box)
    return x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)


_PALETTE = {name: np.array(rgb, dtype=np.uint8) for name, rgb in vocab.COLOURS.items()}


def _draw(canvas: np.ndarray, scene: Scene) -> None:
    """Paint the scene's objects onto an H x W x 3 canvas already filled with the background."""
    resolution = canvas.shape[0]
    for obj in scene.objects:
        x0, y0, x1, y1 = pixel_box(obj.box, resolution)
        canvas[y0:y1, x0:x1][shape_mask(obj.shape, y1 - y0, x1 - x0)] = _PALETTE[obj.colour]


def render(scene: Scene, resolution: int = 32) -> np.ndarray:
    """The scene as an H x W x 3 uint8 image: flat palette fills on the background, no anti-aliasing."""
    canvas = np.empty((resolution, resolution, 3), dtype=np.uint8)
    canvas[:] = vocab.BACKGROUND
    _draw(canvas, scene)
    return canvas


def make_batch(
    seed: int, n: int, resolution: int = 32, caption_dropout: float = 0.0, omit_named: float = 0.0
) -> tuple[list[str], np.ndarray]:
    """n training scenes from the training mix: (captions, N x H x W x 3 uint8 images), deterministic in seed.

    A `caption_dropout` fraction of captions is replaced by "" (the unconditional prompt for
    classifier-free guidance); their images are still drawn. An `omit_named` fraction of the scenes with
    two or more objects leaves one of them (chosen at random) out of the image while the caption still names
    it: captions that name more than the picture shows, as web captions do, teach a model that a named object
    may be missing — the word neglect that attention regulation is meant to undo. ``omit_named=0`` draws the
    same batches as before the option existed.
    """
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng) for _ in range(n)]
    dropped = rng.random(n) < caption_dropout
    omitted = [-1] * n
    if omit_named > 0:
        omit, pick = rng.random(n) < omit_named, rng.random(n)
        omitted = [int(p * len(s.objects)) if o and len(s.objects) > 1 else -1
                   for s, o, p in zip(scenes, omit, pick, strict=True)]
    images = np.empty((n, resolution, resolution, 3), dtype=np.uint8)
    images[:] = vocab.BACKGROUND
    for canvas, scene, left_out in zip(images, scenes, omitted, strict=True):
        drawn = scene if left_out < 0 else replace(
            scene, objects=scene.objects[:left_out] + scene.objects[left_out + 1:])
        _draw(canvas, drawn)
    captions = ["" if d else s.caption for s, d in zip(scenes, dropped, strict=True)]
    return captions, images


# --------------------------------------------------------------------------------------------- prompt sets

PROMPT_SETS: dict[str, int] = {
    "single": 18,
    "pair": 24,
    "triple": 24,
    "relation": 24,
    "count": 24,
    "position": 24,
}
"""Evaluation prompt sets and their default sizes (single: every colour x shape once)."""

_SET_SEEDS: dict[str, int] = {name: 7919 * (i + 1) for i, name in enumerate(PROMPT_SETS)}


WORD_KINDS: tuple[str, ...] = ("shapes", "colours", "both", "phrases")
"""What :func:`object_words` takes from each object of a prompt item."""


def object_words(item: dict[str, Any], which: str = "shapes") -> list[str]:
    """The words a word control (``AttentionRegulation(targets=...)``, ``AttentionProbe(words=...)``) should name
    for a prompt item: its objects' shape words, colour words, both, or one ``"<colour> <shape>"`` phrase per
    object; each once, in prompt order. A shape counted more than once is named as the caption says it, in the
    plural ("two yellow circles": "circles"). An item without ``objects`` has them read from its caption."""
    if which not in WORD_KINDS:
        raise AttnCtlError(f"unknown word kind {which!r}", f"use one of {', '.join(WORD_KINDS)}")
    objects = item["objects"] if "objects" in item else parse_caption(item["prompt"])["objects"]
    if which == "phrases":
        return list(dict.fromkeys(f"{o['colour']} {_shape_word(o)}" for o in objects))
    words: list[str] = []
    for obj in objects:
        if which in ("shapes", "both"):
            words.append(_shape_word(obj))
        if which in ("colours", "both"):
            words.append(obj["colour"])
    return list(dict.fromkeys(words))


def _shape_word(obj: dict[str, Any]) -> str:
    """The shape word a caption uses for an object: the plural for a count above one ("two red circles")."""
    return vocab.PLURALS[obj["shape"]] if int(obj.get("count", 1)) > 1 else obj["shape"]


BOX_KEYS: tuple[str, ...] = ("colours", "shapes", "phrases")
"""What :func:`object_boxes` keys each object's box by."""


def object_boxes(item: dict[str, Any], key: str = "colours") -> dict[str, list[float]]:
    """A prompt item's layout as ``LayoutGuidance(boxes=...)`` takes it: each object's box keyed by its colour word,
    its shape word, or its ``"<colour> <shape>"`` phrase. The item needs "boxes" (one per object instance), one
    instance per object, and keys that tell the objects apart (two squares cannot be keyed by "square")."""
    if key not in BOX_KEYS:
        raise AttnCtlError(f"unknown box key {key!r}", f"use one of {', '.join(BOX_KEYS)}")
    objects = item["objects"] if "objects" in item else parse_caption(item["prompt"])["objects"]
    boxes = item.get("boxes")
    if not boxes:
        raise AttnCtlError(f"the prompt item {item['prompt']!r} has no boxes",
                           'give it "boxes": one [x0, y0, x1, y1] per object, in order')
    if any(int(o.get("count", 1)) != 1 for o in objects) or len(boxes) != len(objects):
        raise AttnCtlError(f"the prompt item {item['prompt']!r} counts several instances of an object, so its boxes "
                           "cannot be keyed by words", "use items with one instance per object (pair, triple sets)")
    out: dict[str, list[float]] = {}
    for obj, box in zip(objects, boxes, strict=True):
        name = {"colours": obj["colour"], "shapes": obj["shape"], "phrases": f"{obj['colour']} {obj['shape']}"}[key]
        if name in out:
            raise AttnCtlError(f"two objects of {item['prompt']!r} share the {key[:-1]} {name!r}",
                               "key the boxes by phrases (colour and shape)")
        out[name] = list(box)
    return out


def item_from_scene(scene: Scene) -> dict[str, Any]:
    """A prompt item for a scene: its caption parsed into objects (and relation) plus its boxes as layout."""
    item: dict[str, Any] = {"prompt": scene.caption, "kind": scene.kind}
    item.update(parse_caption(scene.caption))
    item["boxes"] = [list(o.box) for o in scene.objects]
    return item


def scene_from_item(item: dict[str, Any]) -> Scene:
    """The ground-truth scene of a prompt item that has "boxes" (one per object instance, in order)."""
    objects = item.get("objects") or parse_caption(item["prompt"])["objects"]
    instances = [(o["shape"], o["colour"]) for o in objects for _ in range(int(o.get("count", 1)))]
    boxes = item["boxes"]
    if len(boxes) != len(instances):
        raise ValueError(f"{len(boxes)} boxes for {len(instances)} objects in {item['prompt']!r}")
    threshold = (SIZE_UNITS["small"] + SIZE_UNITS["large"]) / 2 / GRID
    out = tuple(
        WorldObject(shape, colour, _box(box), "large" if box[2] - box[0] >= threshold else "small")
        for (shape, colour), box in zip(instances, boxes, strict=True)
    )
    return Scene(caption=item["prompt"], objects=out, kind=item.get("kind", "custom"))


def _single_scenes(rng: np.random.Generator, n: int) -> list[Scene]:
    """Every colour x shape in a fixed shuffled order, cycling (with new layouts) when n exceeds 18."""
    combos = [(c, s) for c in vocab.COLOURS for s in vocab.SHAPES]
    order = [combos[i] for i in rng.permutation(len(combos))]
    return [_build_scene(rng, [_Spec(s, c)], "single") for c, s in (order[i % len(order)] for i in range(n))]


def prompt_set(name: str, n: int | None = None) -> list[dict]:
    """A fixed evaluation prompt set (see :data:`PROMPT_SETS`), deterministic, the first `n` items.

    Each item is ``{"prompt", "kind", "objects": [{"shape", "colour", "count", "position"?}], "boxes",
    "relation"?}`` (see :func:`parse_caption`); "boxes" is the ground-truth layout, one box per object
    instance in order, usable as a requested layout. Captions carry no size words; prompts are distinct
    while the set's grammar allows.
    """
    if name not in PROMPT_SETS:
        raise ValueError(f"unknown prompt set {name!r}; known sets: {', '.join(PROMPT_SETS)}")
    n = PROMPT_SETS[name] if n is None else n
    rng = np.random.default_rng(_SET_SEEDS[name])
    if name == "single":
        return [item_from_scene(s) for s in _single_scenes(rng, n)]
    scenes: list[Scene] = []
    seen: set[str] = set()
    for _ in range(50 * n):
        if len(scenes) == n:
            break
        scene = _sample(rng, name, size_prob=0.0)
        if scene.caption not in seen:
            seen.add(scene.caption)
            scenes.append(scene)
    while len(scenes) < n:
        scenes.append(_sample(rng, name, size_prob=0.0))
    return [item_from_scene(s) for s in scenes]
