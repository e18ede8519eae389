"""The exact shapes evaluator: detection, per-image metrics and set aggregation."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from attnctl.toyworld import vocab
from attnctl.toyworld.evaluate import METRICS, detect_objects, evaluate_image, evaluate_set
from attnctl.toyworld.world import PROMPT_SETS, Scene, WorldObject, prompt_set, render, scene_from_item

PERFECT = {name: (0.0 if name == "leakage" else 1.0) for name in METRICS}


def _scene(*objects: tuple[str, str, tuple[float, float, float, float]], caption: str = "") -> Scene:
    return Scene(caption, tuple(WorldObject(s, c, box, "large") for s, c, box in objects), "custom")


LEFT = (3 / 32, 10 / 32, 16 / 32, 23 / 32)
RIGHT = (18 / 32, 10 / 32, 31 / 32, 23 / 32)


@pytest.mark.parametrize("resolution", [32, 64])
@pytest.mark.parametrize("name", list(PROMPT_SETS))
def test_ground_truth_renders_score_perfectly(name, resolution):
    items = prompt_set(name)
    images = [render(scene_from_item(item), resolution) for item in items]
    for image, item in zip(images, items, strict=True):
        scores = evaluate_image(image, item)
        assert scores == {k: PERFECT[k] for k in scores}, item["prompt"]
    summary = evaluate_set(images, items)
    for key in ("presence", "count_accuracy", "colour_binding", "box_iou", "sharpness", "background_clean"):
        assert summary[key] == 1.0
    assert summary["leakage"] == 0.0
    if name == "relation":
        assert summary["relation_accuracy"] == 1.0
    if name == "position":
        assert summary["position_accuracy"] == 1.0


@pytest.mark.parametrize("resolution", [32, 64])
def test_detection_recovers_ground_truth(resolution):
    item = prompt_set("triple", 1)[0]
    scene = scene_from_item(item)
    found = sorted(detect_objects(render(scene, resolution)), key=lambda o: o.box)
    truth = sorted(scene.objects, key=lambda o: o.box)
    assert [(o.shape, o.colour, o.box) for o in found] == [(o.shape, o.colour, o.box) for o in truth]
    assert all(o.shape_score == 1.0 for o in found)


def test_blank_image_scores_zero_presence():
    blank = np.full((32, 32, 3), vocab.BACKGROUND, dtype=np.uint8)
    scores = evaluate_image(blank, prompt_set("pair", 1)[0])
    assert scores["presence"] == 0.0 and scores["object_recall"] == 0.0 and scores["box_iou"] == 0.0
    assert "leakage" not in scores and "colour_binding" not in scores
    assert scores["background_clean"] == 1.0 and scores["sharpness"] == 1.0


def test_wrong_colour_scores_binding_zero():
    image = render(_scene(("circle", "blue", LEFT)))
    scores = evaluate_image(image, {"prompt": "a red circle"})
    assert scores["colour_binding"] == 0.0
    assert scores["presence"] == 0.0 and scores["shape_accuracy"] == 1.0
    assert scores["leakage"] == 1.0


def test_swapped_colours_bind_zero_but_colours_present():
    image = render(_scene(("circle", "blue", LEFT), ("square", "red", RIGHT)))
    scores = evaluate_image(image, {"prompt": "a red circle and a blue square"})
    assert scores["colour_binding"] == 0.0 and scores["colour_accuracy"] == 1.0 and scores["leakage"] == 0.0


def test_relation_and_position_are_checked():
    image = render(_scene(("circle", "red", LEFT), ("square", "blue", RIGHT)))

    def relation(prompt: str) -> float:
        return evaluate_image(image, {"prompt": prompt})["relation_accuracy"]

    assert relation("a red circle to the left of a blue square") == 1.0
    assert relation("a blue square to the right of a red circle") == 1.0
    assert relation("a red circle to the right of a blue square") == 0.0
    assert relation("a red circle above a blue square") == 0.0
    good = evaluate_image(image, {"prompt": "a red circle on the left and a blue square on the right"})
    bad = evaluate_image(image, {"prompt": "a blue square on the left"})
    assert good["position_accuracy"] == 1.0 and bad["position_accuracy"] == 0.0
    assert "position_accuracy" not in evaluate_image(image, {"prompt": "a red circle"})


def test_counts_and_leakage():
    image = render(_scene(("triangle", "green", LEFT), ("triangle", "green", RIGHT)))
    two = evaluate_image(image, {"prompt": "two green triangles"})
    three = evaluate_image(image, {"prompt": "three green triangles"})
    one = evaluate_image(image, {"prompt": "a green triangle"})
    assert two["count_accuracy"] == 1.0 and two["presence"] == 1.0
    assert three["count_accuracy"] == 0.0 and three["presence"] == 0.0 and three["object_recall"] == 2 / 3
    assert one["count_accuracy"] == 0.0 and one["presence"] == 1.0
    mixed = render(_scene(("triangle", "green", LEFT), ("square", "yellow", RIGHT)))
    assert 0.0 < evaluate_image(mixed, {"prompt": "a green triangle"})["leakage"] < 1.0


def test_box_iou_against_requested_layout():
    image = render(_scene(("square", "red", LEFT)))
    assert evaluate_image(image, {"prompt": "a red square", "boxes": [list(LEFT)]})["box_iou"] == 1.0
    assert evaluate_image(image, {"prompt": "a red square", "boxes": [list(RIGHT)]})["box_iou"] == 0.0


def test_specks_are_ignored_and_dirty_background_detected():
    image = render(_scene(("square", "red", LEFT)))
    image[1, 30] = vocab.COLOURS["blue"]
    image[30, 30] = (90, 90, 90)
    assert [o.colour for o in detect_objects(image)] == ["red"]
    scores = evaluate_image(image, {"prompt": "a red square"})
    assert scores["presence"] == 1.0 and scores["leakage"] == 0.0
    assert scores["background_clean"] < 1.0 and scores["sharpness"] < 1.0


def test_mild_blur_keeps_objects():
    items = prompt_set("triple", 6)
    sharp = [render(scene_from_item(it)).astype(float) for it in items]
    blurred = [ndimage.gaussian_filter(im, (0.7, 0.7, 0)).round().astype(np.uint8) for im in sharp]
    summary = evaluate_set(blurred, items)
    assert summary["presence"] == 1.0 and summary["box_iou"] > 0.9
    assert summary["sharpness"] < 1.0


def test_evaluate_set_skips_inapplicable_metrics():
    items = [{"prompt": "a red circle"}, {"prompt": "a red circle to the left of a blue square"}]
    images = [render(_scene(("circle", "red", LEFT)))] * 2
    summary = evaluate_set(images, items)
    assert summary["n_images"] == 2 and summary["n_relation_accuracy"] == 1
    assert summary["relation_accuracy"] == 0.0 and summary["presence"] == 0.5
    assert "box_iou" not in summary
    with pytest.raises(ValueError):
        evaluate_set(images, items[:1])


def test_float_images_are_accepted():
    image = render(_scene(("square", "red", LEFT))).astype(np.float32) / 255
    assert evaluate_image(image, {"prompt": "a red square"})["presence"] == 1.0


def test_an_item_that_gives_its_objects_keeps_its_prompts_relation_and_positions():
    """Giving "objects" used to turn relation and position scoring off: the circle right of the square passed."""
    boxes = [[0.6, 0.3, 0.9, 0.6], [0.05, 0.3, 0.35, 0.6]]  # the red circle on the RIGHT of the blue square
    plain = {"prompt": "a red circle to the left of a blue square", "boxes": boxes}
    given = dict(plain, objects=[{"shape": "circle", "colour": "red"}, {"shape": "square", "colour": "blue"}])
    image = render(scene_from_item(plain))
    assert evaluate_image(image, plain)["relation_accuracy"] == 0.0
    assert evaluate_image(image, given)["relation_accuracy"] == 0.0
    assert "relation_accuracy" not in evaluate_image(image, dict(given, relation=None))  # the item's own word wins
    positioned = {"prompt": "a red circle on the left", "objects": [{"shape": "circle", "colour": "red"}],
                  "boxes": [[0.6, 0.3, 0.9, 0.6]]}
    assert evaluate_image(render(scene_from_item(positioned)), positioned)["position_accuracy"] == 0.0
    other = dict(positioned, objects=[{"shape": "square", "colour": "red"}])  # objects the prompt does not name
    assert "position_accuracy" not in evaluate_image(render(scene_from_item(other)), other)
    unnamed = {k: v for k, v in given.items() if k != "prompt"}  # objects alone (an edit's target): no prompt to read
    scores = evaluate_image(image, unnamed)
    assert scores["presence"] == 1.0 and "relation_accuracy" not in scores
