"""The shapes world: scenes, captions, rendering, batches and prompt sets."""

from __future__ import annotations

import numpy as np
import pytest

from attnctl.toyworld import vocab
from attnctl.toyworld.world import (
    GRID,
    KINDS,
    MARGIN,
    PROMPT_SETS,
    Scene,
    WorldObject,
    check_words,
    item_from_scene,
    make_batch,
    parse_caption,
    pixel_box,
    prompt_set,
    render,
    sample_scene,
    scene_from_item,
    shape_mask,
)


def _scenes(n: int, kind: str | None = None, seed: int = 0) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, kind) for _ in range(n)]


def test_captions_use_only_vocabulary_words():
    known = set(vocab.words())
    for scene in _scenes(3000):
        assert set(scene.caption.split()) <= known, scene.caption


def test_every_kind_is_sampled_and_single_objects_are_common():
    kinds = [s.kind for s in _scenes(2000)]
    assert set(kinds) == set(KINDS)
    assert kinds.count("single") / len(kinds) > 0.2


@pytest.mark.parametrize("kind", KINDS)
def test_objects_are_valid_inside_and_apart(kind):
    for scene in _scenes(300, kind, seed=1):
        assert 1 <= len(scene.objects) <= 3
        for obj in scene.objects:
            assert obj.shape in vocab.SHAPES and obj.colour in vocab.COLOURS and obj.size in vocab.SIZE_WORDS
            x0, y0, x1, y1 = obj.box
            assert MARGIN / GRID <= x0 < x1 <= 1 - MARGIN / GRID
            assert MARGIN / GRID <= y0 < y1 <= 1 - MARGIN / GRID
        for i, a in enumerate(scene.objects):
            for b in scene.objects[i + 1 :]:
                overlap_x = a.box[0] < b.box[2] and b.box[0] < a.box[2]
                overlap_y = a.box[1] < b.box[3] and b.box[1] < a.box[3]
                assert not (overlap_x and overlap_y), scene


def test_caption_examples_per_kind():
    captions = {kind: [s.caption for s in _scenes(200, kind, seed=2)] for kind in KINDS}
    assert any(" on the left" in c for c in captions["position"])
    assert any(" at the top" in c for c in captions["position"])
    assert any(" to the left of " in c for c in captions["relation"])
    assert any(" above " in c for c in captions["relation"])
    assert any(c.startswith("two ") for c in captions["count"])
    assert any(c.startswith("three ") for c in captions["count"])
    plain = {"pair": 1, "triple": 2}
    for kind, ands in plain.items():
        for c in captions[kind]:
            assert c.split().count("and") == ands
            assert not {"left", "right", "top", "bottom", "above", "below"} & set(c.split())


def test_scene_json_round_trip():
    for scene in _scenes(50):
        assert Scene.from_json(scene.to_json()) == scene


def test_parse_caption_matches_scene():
    for scene in _scenes(500, seed=3):
        parsed = parse_caption(scene.caption)
        instances = [(o["shape"], o["colour"]) for o in parsed["objects"] for _ in range(o["count"])]
        assert instances == [(o.shape, o.colour) for o in scene.objects]
        assert ("relation" in parsed) == (scene.kind == "relation")


def test_parse_caption_structure():
    parsed = parse_caption("a small red circle to the left of two blue squares")
    assert parsed["objects"] == [
        {"shape": "circle", "colour": "red", "count": 1, "size": "small"},
        {"shape": "square", "colour": "blue", "count": 2},
    ]
    assert parsed["relation"] == {"subject": 0, "relation": "left", "object": 1}
    assert parse_caption("an orange triangle at the bottom")["objects"][0]["position"] == "bottom"
    assert parse_caption("") == {"objects": []}
    three = parse_caption("A red circle, a blue square, and a green triangle")["objects"]
    assert [o["colour"] for o in three] == ["red", "blue", "green"]


def test_unknown_words_are_named():
    with pytest.raises(ValueError, match="pink") as err:
        check_words("a pink circle")
    assert "red" in str(err.value)
    with pytest.raises(ValueError, match="cannot parse"):
        parse_caption("circle red a")
    with pytest.raises(ValueError, match="cannot parse"):
        parse_caption("two red circle")


def test_shape_masks_fill_their_box():
    for shape in vocab.SHAPES:
        for side in (9, 13, 18, 26):
            mask = shape_mask(shape, side, side)
            assert mask[0].any() and mask[-1].any() and mask[:, 0].any() and mask[:, -1].any()
    fill = {s: shape_mask(s, 13, 13).mean() for s in vocab.SHAPES}
    assert fill["square"] == 1.0
    assert abs(fill["circle"] - np.pi / 4) < 0.06
    assert abs(fill["triangle"] - 0.5) < 0.1


@pytest.mark.parametrize("resolution", [32, 64])
def test_render_is_flat_palette_and_deterministic(resolution):
    scene = _scenes(1, "triple", seed=4)[0]
    image = render(scene, resolution)
    assert image.shape == (resolution, resolution, 3) and image.dtype == np.uint8
    assert np.array_equal(image, render(scene, resolution))
    allowed = {vocab.BACKGROUND, *vocab.COLOURS.values()}
    assert {tuple(int(v) for v in p) for p in image.reshape(-1, 3)} <= allowed
    for obj in scene.objects:
        x0, y0, x1, y1 = pixel_box(obj.box, resolution)
        painted = (image[y0:y1, x0:x1] == vocab.COLOURS[obj.colour]).all(axis=-1)
        assert np.array_equal(painted, shape_mask(obj.shape, y1 - y0, x1 - x0))


def test_render_sizes_are_distinguishable_at_32():
    small = WorldObject("circle", "red", (0.25, 0.25, 0.25 + 9 / 32, 0.25 + 9 / 32), "small")
    image = render(Scene("a small red circle", (small,), "single"))
    assert 50 < (image == vocab.COLOURS["red"]).all(axis=-1).sum() < 81


def test_make_batch_deterministic_and_dropout():
    captions, images = make_batch(7, 16)
    captions2, images2 = make_batch(7, 16)
    assert captions == captions2 and np.array_equal(images, images2)
    assert images.shape == (16, 32, 32, 3) and images.dtype == np.uint8
    assert all(captions)
    dropped, _ = make_batch(7, 400, caption_dropout=0.1)
    assert 10 <= dropped.count("") <= 80
    assert make_batch(7, 2, resolution=64)[1].shape == (2, 64, 64, 3)


def test_make_batch_omit_named_leaves_one_named_object_out():
    """omit_named draws the same scenes and captions, and leaves exactly one named object out of some
    multi-object images (never out of single-object ones); omit_named=0 is the batch without the option."""
    seed, n = 11, 200
    captions, images = make_batch(seed, n)
    assert make_batch(seed, n, omit_named=0.0)[0] == captions
    assert np.array_equal(make_batch(seed, n, omit_named=0.0)[1], images)
    omit_captions, omit_images = make_batch(seed, n, omit_named=0.5)
    assert omit_captions == captions
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng) for _ in range(n)]  # make_batch's scenes: its first draws from the same rng
    changed = 0
    for scene, full, omitted in zip(scenes, images, omit_images, strict=True):
        assert np.array_equal(full, render(scene))
        if np.array_equal(full, omitted):
            continue
        changed += 1
        assert len(scene.objects) > 1
        one_less = [render(Scene(scene.caption, scene.objects[:i] + scene.objects[i + 1:], scene.kind))
                    for i in range(len(scene.objects))]
        assert any(np.array_equal(omitted, im) for im in one_less)
    multi = sum(len(s.objects) > 1 for s in scenes)
    assert 0.3 * multi <= changed <= 0.7 * multi


@pytest.mark.parametrize("name", list(PROMPT_SETS))
def test_prompt_sets_fixed_and_well_formed(name):
    items = prompt_set(name)
    assert len(items) == PROMPT_SETS[name]
    assert items == prompt_set(name)
    assert len({it["prompt"] for it in items}) == len(items)
    assert len(prompt_set(name, 5)) == 5
    for item in items:
        check_words(item["prompt"])
        assert not {"small", "large"} & set(item["prompt"].split())
        assert len(item["boxes"]) == sum(o["count"] for o in item["objects"])
        assert item_from_scene(scene_from_item(item)) == item
    if name == "single":
        assert {(it["objects"][0]["colour"], it["objects"][0]["shape"]) for it in items} == {
            (c, s) for c in vocab.COLOURS for s in vocab.SHAPES
        }
    if name == "relation":
        assert all("relation" in it for it in items)
    if name == "position":
        assert all(all("position" in o for o in it["objects"]) for it in items)


def test_unknown_prompt_set_and_kind():
    with pytest.raises(ValueError, match="known sets"):
        prompt_set("nope")
    with pytest.raises(ValueError, match="known kinds"):
        sample_scene(np.random.default_rng(0), "nope")


def test_object_words_name_a_counted_shape_in_the_plural_the_prompt_uses():
    """On the count set --words-from named "circle" for "two yellow circles", a word the prompt does not hold."""
    from attnctl.toyworld.tokenizer import split_words
    from attnctl.toyworld.world import WORD_KINDS, object_words

    for item in prompt_set("count"):
        words = set(split_words(item["prompt"]))
        for kind in WORD_KINDS:
            for word in object_words(item, kind):
                assert set(word.split()) <= words, (item["prompt"], kind, word)
    item = {"prompt": "two yellow circles and a red square"}
    assert object_words(item, "shapes") == ["circles", "square"]
    assert object_words(item, "phrases") == ["yellow circles", "red square"]
    assert object_words(item, "both") == ["circles", "yellow", "square", "red"]


def test_caption_checks_split_punctuation_as_the_tokenizer_does():
    """"a red circle." was blamed on 'circle.' by eval and headhunt, and on '.' by generate (the tokenizer's split)."""
    with pytest.raises(ValueError) as err:
        check_words("a red circle.")
    assert "'.'" in str(err.value) and "circle." not in str(err.value)
    with pytest.raises(ValueError, match="'!'"):
        parse_caption("a red circle!")
    assert parse_caption("A red circle, a blue square, and a green triangle")["objects"][2]["shape"] == "triangle"
