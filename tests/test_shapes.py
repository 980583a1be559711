"""ShapesVQA: determinism, split separation, answer correctness (checked by an independent reader
of the question text against the Scene), balance, geometry, curriculum and patch targets."""

from __future__ import annotations

import re
from collections import Counter
from itertools import combinations

import numpy as np
import pytest

from quota_compile.data.shapes import (
    BACKGROUND,
    COLOUR_PRIOR,
    COLOURS,
    KIND_PRIOR,
    KINDS,
    Question,
    Scene,
    Shape,
    answer_vocabulary,
    curriculum,
    generate,
    make_sample,
    patch_targets,
    question_families,
    render,
    render_array,
    shape_mask,
    to_chat,
)

SIZE, PATCH = 64, 8
PLURAL = {"circles": "circle", "squares": "square", "triangles": "triangle", "crosses": "cross"}
NUMBER = ["zero", "one", "two", "three", "four", "five"]


@pytest.fixture(scope="module")
def full() -> list:
    return generate("train", 2000, 0, SIZE, PATCH, difficulty=1.0)


def _only(scene: Scene, colour: str | None = None, kind: str | None = None) -> Shape:
    """The one shape matching; fails the test if the reference is ambiguous or empty."""
    found = [s for s in scene.shapes if colour in (None, s.colour) and kind in (None, s.kind)]
    assert len(found) == 1, f"{colour} {kind}: {len(found)} matches"
    return found[0]


def _count(scene: Scene, colour: str | None = None, kind: str | None = None) -> int:
    return sum(colour in (None, s.colour) and kind in (None, s.kind) for s in scene.shapes)


def _plain_answer(text: str, scene: Scene) -> str:
    """The answer to a non-choice question text, recomputed from the scene alone."""
    if m := re.fullmatch(r"Is there an? (\w+) (\w+)\?", text):
        return "yes" if _count(scene, m[1], m[2]) else "no"
    if m := re.fullmatch(r"What colour is the (\w+)\?", text):
        return _only(scene, kind=m[1]).colour
    if m := re.fullmatch(r"What shape is the (\w+) object\?", text):
        return _only(scene, colour=m[1]).kind
    if m := re.fullmatch(r"How many (\w+) objects are there\?", text):
        return NUMBER[_count(scene, colour=m[1])]
    if m := re.fullmatch(r"How many (\w+) are there\?", text):
        return NUMBER[_count(scene, kind=PLURAL[m[1]])]
    if m := re.fullmatch(r"Is the (\w+) (\w+) (left of|right of|above|below) the (\w+) (\w+)\?", text):
        a, b = _only(scene, m[1], m[2]), _only(scene, m[4], m[5])
        axis = 0 if m[3] in ("left of", "right of") else 1
        d = a.centre[axis] - b.centre[axis]
        assert abs(d) >= PATCH, f"ambiguous relation: {text} ({d})"
        return "yes" if (d < 0) == (m[3] in ("left of", "above")) else "no"
    if m := re.fullmatch(r"Is the (\w+) (\w+) (on the left or the right|at the top or the bottom)\?", text):
        s = _only(scene, m[1], m[2])
        horizontal = m[3].startswith("on")
        d = s.centre[0 if horizontal else 1] - SIZE / 2
        assert abs(d) >= PATCH, f"ambiguous side: {text} ({d})"
        return ("left" if d < 0 else "right") if horizontal else ("top" if d < 0 else "bottom")
    raise AssertionError(f"unknown question: {text!r}")


def expected_answer(q: Question, scene: Scene) -> str:
    """The answer read off the Scene from the question text alone (not from the generator's
    answer): the independent reader other tests use too."""
    if q.family != "choice":
        return _plain_answer(q.text, scene)
    assert len(q.options) == 4 and len(set(q.options)) == 4
    if q.text == "Which object is in the image?":
        present = [i for i, o in enumerate(q.options) if _count(scene, *o.split())]
        assert len(present) == 1, q.options
        return "ABCD"[present[0]]
    correct = [i for i, o in enumerate(q.options) if o == _plain_answer(q.text, scene)]
    assert len(correct) == 1, (q.text, q.options)
    return "ABCD"[correct[0]]


def test_same_split_and_seed_is_identical():
    a, b = generate("test", 60, 5), generate("test", 60, 5)
    assert [s.question for s in a] == [s.question for s in b]
    assert [s.scene for s in a] == [s.scene for s in b]
    assert [s.image.tobytes() for s in a] == [s.image.tobytes() for s in b]


def test_samples_are_addressable_and_prefix_stable():
    run = generate("train", 20, 3, difficulty=0.6)
    assert run[:7] == generate("train", 7, 3, difficulty=0.6)
    assert make_sample("train", 3, 13, difficulty=0.6) == run[13]


def test_splits_with_the_same_seed_differ():
    runs = {split: generate(split, 200, 0) for split in ("train", "calibration", "test")}
    for x, y in combinations(runs, 2):
        images_x = {s.image.tobytes() for s in runs[x]}
        assert images_x.isdisjoint(s.image.tobytes() for s in runs[y]), (x, y)
        assert [s.question for s in runs[x]] != [s.question for s in runs[y]]


def test_every_family_subtype_and_answer(full):
    questions = [s.question for s in full]
    assert {q.family for q in questions} == set(question_families())
    subtypes = {(q.family, q.subtype) for q in questions}
    expected = {("exists", t) for t in ("random", "popular", "adversarial")}
    expected |= {("choice", t) for t in ("colour", "shape", "count", "object")}
    expected |= {("position", "relation"), ("position", "side"), ("count", "kind"), ("count", "colour")}
    assert expected <= subtypes
    vocabulary = set(answer_vocabulary())
    assert len(vocabulary) == len(answer_vocabulary())
    assert {q.answer for q in questions} == vocabulary


def test_answers_match_an_independent_checker(full):
    for s in full:
        assert s.question.answer == expected_answer(s.question, s.scene), s


def test_exists_negatives_follow_their_pope_type(full):
    prior = {(c, k): pc * pk for c, pc in zip(COLOURS, COLOUR_PRIOR) for k, pk in zip(KINDS, KIND_PRIOR)}
    popular = set(sorted(prior, key=prior.get, reverse=True)[:8])
    seen = Counter()
    for s in full:
        q = s.question
        if q.family != "exists" or q.answer != "no":
            continue
        colour, kind = q.text.removeprefix("Is there ").rstrip("?").split()[-2:]
        seen[q.subtype] += 1
        if q.subtype == "popular":
            assert (colour, kind) in popular
        elif q.subtype == "adversarial":
            assert any(sh.colour == colour or sh.kind == kind for sh in s.scene.shapes)
    assert min(seen.values()) >= 30


def test_answers_are_balanced(full):
    yes_no = [s.question for s in full if s.question.answer in ("yes", "no")]
    assert len(yes_no) > 400
    assert 0.4 <= np.mean([q.answer == "yes" for q in yes_no]) <= 0.6
    for family in ("exists", "position"):
        answers = [q.answer == "yes" for q in yes_no if q.family == family]
        assert 0.4 <= np.mean(answers) <= 0.6, family
    counts = Counter(s.question.answer for s in full if s.question.family == "count")
    assert set(counts) == set(NUMBER) and min(counts.values()) >= 0.1 * sum(counts.values())
    letters = Counter(s.question.answer for s in full if s.question.family == "choice")
    assert set(letters) == set("ABCD") and max(letters.values()) <= 0.35 * sum(letters.values())


def test_shapes_fit_do_not_overlap_and_respect_sizes(full):
    for s in full:
        shapes = s.scene.shapes
        assert s.image.size == (SIZE, SIZE) and s.image.mode == "RGB"
        for shape in shapes:
            x0, y0, x1, y1 = shape.box
            assert 0 <= x0 < x1 <= SIZE and 0 <= y0 < y1 <= SIZE
            assert x1 - x0 == shape.size == y1 - y0
            if shape.small:
                assert PATCH <= shape.size < 1.5 * PATCH
            else:
                assert shape.size >= 1.5 * PATCH
        for a, b in combinations(shapes, 2):
            (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a.box, b.box
            assert ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0, (a, b)


def test_curriculum_small_shapes_only_when_hard(full):
    assert sum(shape.small for s in full for shape in s.scene.shapes) > 200
    easy = generate("train", 500, 0, difficulty=0.0)
    assert not any(shape.small for s in easy for shape in s.scene.shapes)
    assert max(len(s.scene.shapes) for s in easy) == 2
    assert min(shape.size for s in easy for shape in s.scene.shapes) >= 2 * PATCH
    assert {s.question.family for s in easy} == {"exists", "colour", "shape"}
    assert max(len(s.scene.shapes) for s in full) >= 6
    assert curriculum(1.0).families == tuple(question_families())


def test_families_can_be_restricted():
    samples = generate("test", 100, 1, families=["count", "position"])
    assert {s.question.family for s in samples} == {"count", "position"}
    for s in samples:
        assert s.question.answer == expected_answer(s.question, s.scene)


def test_patch_targets_agree_with_the_rendered_image(full):
    g = SIZE // PATCH
    colour_rgb = list(COLOURS.values())
    for s in full[:300]:
        pixels = render_array(s.scene).reshape(g, PATCH, g, PATCH, 3).transpose(0, 2, 1, 3, 4).reshape(g * g, PATCH * PATCH, 3)
        t = patch_targets(s.scene, SIZE, PATCH)
        assert all(v.shape == (g * g,) for v in t.values())
        foreground = (pixels != BACKGROUND).any(-1)
        np.testing.assert_allclose(t["coverage"], foreground.mean(-1))
        assert np.array_equal(t["covered"], (foreground.mean(-1) > 0.5).astype(int))
        assert np.array_equal(t["colour"] >= 0, t["kind"] >= 0)
        for p in np.flatnonzero(t["colour"] >= 0):
            rgb = colour_rgb[t["colour"][p]]
            assert (pixels[p] == rgb).all(-1).any()
            # The labelled colour covers at least 1/8 of the patch and, unless another colour
            # there belongs to several shapes, at least as much as any other colour.
            counts = {tuple(int(v) for v in c): n for c, n in zip(*np.unique(pixels[p][foreground[p]], axis=0, return_counts=True))}
            assert counts[rgb] >= PATCH * PATCH / 8
            shared = {COLOURS[c] for c, n in Counter(sh.colour for sh in s.scene.shapes).items() if n > 1}
            if not shared & (set(counts) - {rgb}):
                assert counts[rgb] == max(counts.values())
            row, col = divmod(int(p), g)
            owners = [
                sh for sh in s.scene.shapes
                if sh.colour == list(COLOURS)[t["colour"][p]] and sh.kind == KINDS[t["kind"][p]]
                and sh.box[0] < (col + 1) * PATCH and sh.box[2] > col * PATCH
                and sh.box[1] < (row + 1) * PATCH and sh.box[3] > row * PATCH
            ]
            assert owners, (s.scene, p)
        assert (t["colour"][t["covered"] == 1] >= 0).all()


def test_small_shapes_are_supervised():
    """Every small shape labels at least one patch, wherever it falls on the grid."""
    for s in generate("train", 300, 2):
        t = patch_targets(s.scene, SIZE, PATCH)
        labelled = set(zip(t["colour"].tolist(), t["kind"].tolist()))
        for shape in (sh for sh in s.scene.shapes if sh.small):
            twins = sum(o.colour == shape.colour and o.kind == shape.kind for o in s.scene.shapes)
            assert (list(COLOURS).index(shape.colour), KINDS.index(shape.kind)) in labelled or twins > 1


@pytest.mark.parametrize("size", [8, 10, 12, 16, 20])
def test_kinds_are_distinguishable(size):
    masks = {k: shape_mask(k, size) for k in KINDS}
    for k, m in masks.items():  # each footprint spans its box
        assert m.any(0).all() and m.any(1).all(), k
    assert masks["square"].sum() > masks["circle"].sum() > max(masks["triangle"].sum(), masks["cross"].sum())
    for a, b in combinations(KINDS, 2):
        assert (masks[a] != masks[b]).mean() >= 0.15, (a, b)
    for kind, mask in masks.items():  # the renderer draws exactly the footprint
        scene = Scene(SIZE, BACKGROUND, (Shape(kind, "red", size, (20 + size / 2, 30 + size / 2)),))
        drawn = (np.asarray(render(scene)) == COLOURS["red"]).all(-1)
        assert np.array_equal(drawn[30 : 30 + size, 20 : 20 + size], mask) and drawn.sum() == mask.sum()


def test_colours_are_well_separated():
    rgb = np.array([*COLOURS.values(), BACKGROUND], dtype=float)
    distances = np.linalg.norm(rgb[:, None] - rgb[None], axis=-1)
    assert distances[~np.eye(len(rgb), dtype=bool)].min() >= 80


def test_chat_format():
    assert to_chat(Question("exists", "random", "Is there a red circle?", "no")) == "Is there a red circle? Answer yes or no."
    assert to_chat(Question("colour", "", "What colour is the circle?", "red")).endswith("Answer with one word.")
    q = Question("choice", "colour", "What colour is the circle?", "B", ("blue", "red", "green", "white"))
    assert to_chat(q) == "What colour is the circle?\nA. blue\nB. red\nC. green\nD. white\nAnswer with the letter."


@pytest.mark.parametrize(
    "kwargs",
    [{"split": "val"}, {"seed": -1}, {"difficulty": 1.5}, {"families": ["nope"]}, {"image_size": 60}, {"image_size": 32}],
)
def test_invalid_arguments(kwargs):
    args = {"split": "train", "n": 1, "seed": 0} | kwargs
    with pytest.raises(ValueError):
        generate(**args)
