"""Exact scoring of shapes-world images against prompt items.

Pixels are snapped to the nearest palette colour (or background), pixels far from every palette colour
are "unknown" (blur), each colour's connected components become objects, and each object's shape is the
template (circle, square or triangle filling the object's bounding box) that overlaps it best. The
metrics compare these objects with the prompt item's objects, counts, positions, relation and boxes.
A ground-truth render (:func:`attnctl.toyworld.world.render`) scores perfectly by construction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from attnctl.toyworld import vocab
from attnctl.toyworld.world import parse_caption, relation_offsets, shape_mask

COLOUR_THRESHOLD = 40.0
"""RGB distance beyond which a pixel matches no palette colour and counts as unknown (blur)."""

MIN_AREA = 0.008
"""Components smaller than this fraction of the image are specks, not objects (8.2 px at 32x32: 9 px is the
smallest object kept, 8 px is dropped)."""

MIN_SHAPE_IOU = 0.5
"""An object whose best shape template overlaps it less than this is of "unknown" shape."""

POSITION_DEAD_ZONE = 0.05
"""An object is "on the left" if its centroid is left of 0.5 - this (likewise for the other sides)."""

COLOUR_NAMES: tuple[str, ...] = tuple(vocab.COLOURS)
"""Segmentation labels: 0 is background, i + 1 is COLOUR_NAMES[i], -1 is unknown."""

_PALETTE = np.array([vocab.BACKGROUND, *vocab.COLOURS.values()], dtype=np.float32)
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)

METRICS: tuple[str, ...] = (
    "presence",
    "object_recall",
    "count_accuracy",
    "colour_accuracy",
    "shape_accuracy",
    "colour_binding",
    "leakage",
    "position_accuracy",
    "relation_accuracy",
    "box_iou",
    "background_clean",
    "sharpness",
)
"""Everything :func:`evaluate_image` may report; for leakage lower is better, for the rest higher."""


@dataclass(frozen=True)
class DetectedObject:
    """An object found in an image; box (x0, y0, x1, y1), centroid (x, y) and area are image fractions."""

    colour: str
    shape: str
    box: tuple[float, float, float, float]
    centroid: tuple[float, float]
    area: float
    pixels: int
    shape_score: float
    """IoU of the object's mask with its shape's template; 1.0 for a drawn shape."""


# --------------------------------------------------------------------------------------------- detection


def _as_uint8(image: Any) -> np.ndarray:
    """An H x W x 3 uint8 array from uint8 or [0, 1] float input."""
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an H x W x 3 image, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        scale = 255.0 if float(arr.max(initial=0.0)) <= 1.0 else 1.0
        arr = np.clip(np.round(arr.astype(np.float64) * scale), 0, 255).astype(np.uint8)
    return arr


def segment_colours(image: np.ndarray, threshold: float = COLOUR_THRESHOLD) -> np.ndarray:
    """Per-pixel labels: 0 background, i + 1 for COLOUR_NAMES[i], -1 for pixels near no palette colour."""
    pixels = _as_uint8(image).astype(np.float32)
    dist = np.linalg.norm(pixels[:, :, None, :] - _PALETTE[None, None], axis=-1)
    labels = dist.argmin(axis=-1).astype(np.int64)
    labels[dist.min(axis=-1) > threshold] = -1
    return labels


def matte_labels(image: np.ndarray, labels: np.ndarray, threshold: float = COLOUR_THRESHOLD) -> np.ndarray:
    """Give unknown pixels to the colour they are mostly made of, if they are a colour/background blend.

    An unknown pixel p is a blend of background b and colour c when p - b is close (within `threshold`)
    to alpha * (c - b); it joins c when alpha >= 0.5. This puts a blurred object's outline at its
    half-way edge, where blur leaves straight edges in place, so shapes and boxes survive mild blur.
    Sharp images have no unknown pixels and keep their labels.
    """
    unknown = labels == -1
    if not unknown.any():
        return labels
    pixels = _as_uint8(image)[unknown].astype(np.float32) - _PALETTE[0]
    directions = _PALETTE[1:] - _PALETTE[0]
    alpha = pixels @ directions.T / (directions**2).sum(axis=1)
    residual = np.linalg.norm(pixels[:, None, :] - alpha[:, :, None] * directions[None], axis=-1)
    residual[(alpha < 0.5) | (alpha > 1.5)] = np.inf
    best = residual.argmin(axis=1)
    fits = np.isfinite(residual.min(axis=1)) & (residual.min(axis=1) <= threshold)
    out = labels.copy()
    out[unknown] = np.where(fits, best + 1, -1)
    return out


def classify_shape(mask: np.ndarray) -> tuple[str, float]:
    """(shape, IoU) of the template that best matches a mask cropped to its bounding box."""
    h, w = mask.shape
    best, best_iou = "unknown", 0.0
    for shape in vocab.SHAPES:
        template = shape_mask(shape, h, w)
        iou = float((mask & template).sum() / (mask | template).sum())
        if iou > best_iou:
            best, best_iou = shape, iou
    return (best if best_iou >= MIN_SHAPE_IOU else "unknown"), best_iou


def _components(labels: np.ndarray, min_area: float) -> list[tuple[str, np.ndarray]]:
    """(colour, full-size mask) of each connected component of each colour, specks dropped."""
    min_pixels = min_area * labels.size
    out: list[tuple[str, np.ndarray]] = []
    for index, colour in enumerate(COLOUR_NAMES, start=1):
        components, n = ndimage.label(labels == index, structure=_EIGHT_CONNECTED)
        if n == 0:
            continue
        sizes = np.bincount(components.ravel(), minlength=n + 1)
        out.extend((colour, components == k) for k in range(1, n + 1) if sizes[k] >= min_pixels)
    return out


def _describe(colour: str, mask: np.ndarray) -> DetectedObject:
    """Measure one component."""
    height, width = mask.shape
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    shape, score = classify_shape(mask[y0:y1, x0:x1])
    return DetectedObject(
        colour=colour,
        shape=shape,
        box=(x0 / width, y0 / height, x1 / width, y1 / height),
        centroid=(float(xs.mean() + 0.5) / width, float(ys.mean() + 0.5) / height),
        area=len(xs) / mask.size,
        pixels=len(xs),
        shape_score=score,
    )


def detect_objects(
    image: np.ndarray, min_area: float = MIN_AREA, threshold: float = COLOUR_THRESHOLD
) -> list[DetectedObject]:
    """The objects of an image: one per connected single-colour component of at least `min_area`."""
    labels = matte_labels(image, segment_colours(image, threshold), threshold)
    return [_describe(c, m) for c, m in _components(labels, min_area)]


# --------------------------------------------------------------------------------------------- metrics


def _item_objects(item: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """The item's object specs and relation; what the item leaves out is read from its prompt.

    An item that gives its "objects" still has its prompt's positions and relation scored (unless it gives
    them itself), as long as the prompt parses into those same objects: giving objects used to turn them off.
    """
    if "objects" not in item:
        parsed = parse_caption(item["prompt"])
        return parsed["objects"], item.get("relation", parsed.get("relation"))
    specs = [dict(o) for o in item["objects"]]
    parsed = _prompt_objects(item["prompt"], specs) if isinstance(item.get("prompt"), str) else None
    if parsed is None:
        return specs, item.get("relation")
    for spec, said in zip(specs, parsed["objects"], strict=True):
        if "position" not in spec and "position" in said:
            spec["position"] = said["position"]
    return specs, item.get("relation", parsed.get("relation"))


def _prompt_objects(prompt: str, specs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The prompt parsed, when it names the objects ``specs`` gives (same shapes, colours and counts, in order)."""
    try:
        parsed = parse_caption(prompt)
    except ValueError:  # a prompt outside the world's grammar: the item's objects are all there is
        return None
    said = [(o["shape"], o["colour"], _count(o)) for o in parsed["objects"]]
    given = [(o["shape"], o["colour"], _count(o)) for o in specs]
    return parsed if said == given else None


def _matches(spec: dict[str, Any], objects: list[DetectedObject]) -> list[DetectedObject]:
    return [o for o in objects if o.shape == spec["shape"] and o.colour == spec["colour"]]


def _count(spec: dict[str, Any]) -> int:
    return int(spec.get("count", 1))


def _at_position(obj: DetectedObject, position: str) -> bool:
    """Whether an object's centroid lies on the named side of the image (outside a central dead zone)."""
    x, y = obj.centroid
    low, high = 0.5 - POSITION_DEAD_ZONE, 0.5 + POSITION_DEAD_ZONE
    return {"left": x < low, "right": x > high, "top": y < low, "bottom": y > high}[position]


def _relation_holds(relation: str, a: DetectedObject, b: DetectedObject) -> bool:
    """Whether a is `relation` of b: offset in the right direction, larger than along the other axis."""
    along, across = relation_offsets(relation, a.centroid, b.centroid)
    return along > 0 and along > across


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _layout_iou(
    specs: list[dict[str, Any]], boxes: list[Sequence[float]], objects: list[DetectedObject]
) -> float:
    """Mean IoU of requested boxes with same-colour detections, paired one-to-one to maximise IoU."""
    colours = [s["colour"] for s in specs for _ in range(_count(s))]
    if len(colours) != len(boxes):
        raise ValueError(f"{len(boxes)} boxes for {len(colours)} objects")
    total = 0.0
    for colour in set(colours):
        wanted = [b for c, b in zip(colours, boxes, strict=True) if c == colour]
        found = [o.box for o in objects if o.colour == colour]
        if not found:
            continue
        iou = np.array([[box_iou(w, f) for f in found] for w in wanted])
        rows, cols = linear_sum_assignment(-iou)
        total += float(iou[rows, cols].sum())
    return total / len(boxes)


def _image_quality(labels: np.ndarray, objects_mask: np.ndarray) -> dict[str, float]:
    """Background cleanliness (away from objects) and sharpness (1 - fraction of unknown pixels).

    Background is everything more than one 32-grid pixel away from a detected object, so an object's own
    soft edge counts against sharpness, not against the background.
    """
    reach = max(1, round(labels.shape[0] / 32))
    background = ~ndimage.binary_dilation(objects_mask, structure=_EIGHT_CONNECTED, iterations=reach)
    clean = float((labels[background] == 0).mean()) if background.any() else 1.0
    return {"background_clean": clean, "sharpness": 1.0 - float((labels == -1).mean())}


def _object_metrics(specs: list[dict[str, Any]], objects: list[DetectedObject]) -> dict[str, float]:
    """Presence, recall, counts, colours, shapes and binding of the named objects."""
    found = [len(_matches(s, objects)) for s in specs]
    wanted = [_count(s) for s in specs]
    out = {
        "presence": float(all(f >= w for f, w in zip(found, wanted, strict=True))),
        "object_recall": sum(min(f, w) for f, w in zip(found, wanted, strict=True)) / sum(wanted),
        "count_accuracy": float(found == wanted),
        "colour_accuracy": float(all(any(o.colour == s["colour"] for o in objects) for s in specs)),
        "shape_accuracy": float(all(any(o.shape == s["shape"] for o in objects) for s in specs)),
    }
    bound = [
        any(o.colour == s["colour"] for o in objects if o.shape == s["shape"])
        for s in specs
        if any(o.shape == s["shape"] for o in objects)
    ]
    if bound:
        out["colour_binding"] = float(np.mean(bound))
    return out


def _leakage(specs: list[dict[str, Any]], objects: list[DetectedObject]) -> float:
    """Fraction of object pixels whose colour the prompt did not ask for."""
    asked = {s["colour"] for s in specs}
    return sum(o.pixels for o in objects if o.colour not in asked) / sum(o.pixels for o in objects)


def evaluate_image(image: np.ndarray, item: dict[str, Any]) -> dict[str, float]:
    """Score one image against one prompt item; metrics that do not apply to the item are left out.

    See :data:`METRICS`. Presence, counts, positions and relations look at objects of the named shape
    and colour; binding is scored for named shapes that appear at all; box IoU pairs each requested
    box with a detection of its colour; leakage needs at least one detected object.
    """
    labels = segment_colours(image)
    components = _components(matte_labels(image, labels), MIN_AREA)
    objects = [_describe(c, m) for c, m in components]
    objects_mask = np.zeros(labels.shape, dtype=bool)
    for _, mask in components:
        objects_mask |= mask
    out = _image_quality(labels, objects_mask)
    specs, relation = _item_objects(item)
    if specs:
        out.update(_object_metrics(specs, objects))
        positioned = [s for s in specs if s.get("position")]
        if positioned:
            out["position_accuracy"] = float(
                all(any(_at_position(o, s["position"]) for o in _matches(s, objects)) for s in positioned)
            )
        if item.get("boxes") is not None:
            out["box_iou"] = _layout_iou(specs, item["boxes"], objects)
    if objects:
        out["leakage"] = _leakage(specs, objects)
    if relation is not None:
        subjects = _matches(specs[relation["subject"]], objects)
        others = _matches(specs[relation["object"]], objects)
        out["relation_accuracy"] = float(
            any(_relation_holds(relation["relation"], a, b) for a in subjects for b in others if a is not b)
        )
    return out


def evaluate_set(
    images: Sequence[np.ndarray] | np.ndarray, items: Sequence[dict[str, Any]]
) -> dict[str, float]:
    """Mean of each metric over the images it applies to (image i is scored against items[i]).

    Also reports ``n_images`` and, per metric, ``n_<metric>``: how many images it was averaged over.
    """
    if len(images) != len(items):
        raise ValueError(f"{len(images)} images but {len(items)} prompt items")
    return mean_scores([evaluate_image(image, item) for image, item in zip(images, items, strict=True)])


def mean_scores(per_image: Sequence[dict[str, float]]) -> dict[str, float]:
    """:func:`evaluate_set`'s summary of per-image scores (:func:`evaluate_image` results)."""
    scores: dict[str, list[float]] = {}
    for image_scores in per_image:
        for name, value in image_scores.items():
            scores.setdefault(name, []).append(value)
    out: dict[str, float] = {"n_images": float(len(per_image))}
    for name in METRICS:
        if name in scores:
            out[name] = float(np.mean(scores[name]))
            out[f"n_{name}"] = float(len(scores[name]))
    return out
