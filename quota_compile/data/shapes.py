"""ShapesVQA: a deterministic, procedural visual question answering benchmark.

Why it exists: the hub is unreachable, so the tool trains and evaluates its own small LLaVA-style
model. ShapesVQA mirrors the paper's benchmarks with question families a small model can learn
from scratch on a CPU, and on which dropping visual tokens visibly costs accuracy.

Scenes are crisp shapes (:data:`KINDS`) in well separated colours (:data:`COLOURS`) on a black
background. Main shapes are at least 1.5 patches wide so that every one spans several patch
tokens; at higher difficulty small shapes of about one patch (``Shape.small``) are added. Small
shapes are ordinary objects (they are counted, asked about and referred to), so a pruner that
drops their one or two patches loses the answer. Bounding boxes never overlap.

Question families (:func:`question_families`), each unambiguous given its scene:

- ``exists``: "Is there a red circle?" yes/no, POPE-style; ``subtype`` records how the negative
  object is drawn: ``random`` (any absent object), ``popular`` (absent among the objects most
  frequent under the fixed object prior, identical in every split) or ``adversarial`` (absent but
  sharing an attribute with a present object, preferring a colour and a kind that are both
  present on different objects: the colour-to-shape binding test). Positives carry the subtype
  of the POPE setting they belong to.
- ``colour``: "What colour is the circle?" (exactly one circle in the scene).
- ``shape``: "What shape is the red object?" (exactly one red object in the scene).
- ``count``: "How many circles are there?" / "How many red objects are there?", answered
  ``zero`` ... ``five``; ``subtype`` ``kind`` or ``colour``.
- ``position``: ``relation`` "Is the red circle left of the blue square?" (yes/no; centres at
  least one patch apart along the asked axis) or ``side`` "Is the red circle on the left or the
  right?" (left/right/top/bottom; centre at least one patch from the image's middle). Referred
  objects are unique by colour and kind.
- ``choice``: MMBench-style lettered options (``Question.options``), answer ``A``-``D`` drawn
  uniformly; ``subtype`` ``colour``, ``shape``, ``count`` or ``object`` ("Which object is in the
  image?", one present option and three absent near misses).

Answers are single lowercase words, except choice answers, which are the uppercase option letter.
Yes/no answers are drawn 50/50, counts uniformly over the counts a scene can hold, colour and
shape answers uniformly over their values, and the other objects from a fixed, mildly skewed
prior (that skew is what makes ``popular`` negatives meaningful).

Determinism: sample ``i`` of ``(split, seed)`` is drawn from
``numpy.random.default_rng([SPLIT_IDS[split], seed, i])``. Split ids are fixed distinct
constants, so train seed 0, calibration seed 0 and test seed 0 are unrelated streams; each
sample is independent of ``n`` (a prefix of a longer run is the shorter run) and can be drawn on
its own with :func:`make_sample`.

``difficulty`` in ``[0, 1]`` is a curriculum knob: 0 gives one or two large shapes, no small
shapes and only the ``exists``/``colour``/``shape`` families; 1 gives up to five shapes plus up
to two small ones and all families (see :func:`curriculum`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from PIL import Image

KINDS: tuple[str, ...] = ("circle", "square", "triangle", "cross")
PLURALS: dict[str, str] = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 190, 50),
    "blue": (40, 90, 240),
    "yellow": (240, 220, 40),
    "purple": (150, 50, 210),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
    "cyan": (30, 210, 220),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
BACKGROUND: tuple[int, int, int] = (0, 0, 0)
NUMBERS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five")
SIDES: tuple[str, ...] = ("left", "right", "top", "bottom")
LETTERS: tuple[str, ...] = ("A", "B", "C", "D")

# Fixed forever: changing one changes every generated dataset of that split.
SPLIT_IDS: dict[str, int] = {"train": 11, "calibration": 23, "test": 37}

# Object prior for the shapes a question does not constrain; mildly skewed so that some objects
# are "popular" (POPE's popular negatives), identical in all splits.
KIND_PRIOR: tuple[float, ...] = (0.31, 0.27, 0.23, 0.19)
COLOUR_PRIOR: tuple[float, ...] = (0.16, 0.15, 0.14, 0.13, 0.12, 0.11, 0.10, 0.09)
POPULAR_COUNT = 8  # the most probable (colour, kind) objects under the prior

_FAMILIES: tuple[str, ...] = ("exists", "colour", "shape", "count", "position", "choice")
# A family is asked only from this difficulty on: easy, single-object families first.
_FAMILY_FROM: dict[str, float] = {
    "exists": 0.0, "colour": 0.0, "shape": 0.0, "choice": 0.25, "count": 0.5, "position": 0.5,
}
_YES_NO_INSTRUCTION = "Answer yes or no."
_WORD_INSTRUCTION = "Answer with one word."
_LETTER_INSTRUCTION = "Answer with the letter."
_GAP = 2  # free pixels between bounding boxes
_LABEL_MIN_FRACTION = 1 / 8  # share of a patch a shape needs to label it (patch_targets)
_PLACEMENT_TRIES = 100
_SCENE_TRIES = 200
_MAX_UINT32 = 2**32
_MIN_GRID = 8  # patches per image side
_T = TypeVar("_T")


@dataclass(frozen=True)
class Shape:
    """One object: ``size`` is its bounding box side in pixels, ``centre`` the box centre
    ``(x, y)`` in pixel coordinates (the box is ``[x - size/2, x + size/2)``, on whole pixels).
    ``small`` marks the about-one-patch shapes added at higher difficulty."""

    kind: str
    colour: str
    size: int
    centre: tuple[float, float]
    small: bool = False

    @property
    def box(self) -> tuple[int, int, int, int]:
        """``(x0, y0, x1, y1)`` with exclusive ``x1, y1``."""
        x0 = int(self.centre[0] - self.size / 2)
        y0 = int(self.centre[1] - self.size / 2)
        return x0, y0, x0 + self.size, y0 + self.size


@dataclass(frozen=True)
class Scene:
    """A square image of ``image_size`` pixels: ``shapes`` drawn on ``background``."""

    image_size: int
    background: tuple[int, int, int]
    shapes: tuple[Shape, ...]


@dataclass(frozen=True)
class Question:
    """``family`` is one of :func:`question_families`; ``subtype`` its variant (the POPE negative
    type for ``exists``, empty where a family has none); ``options`` only for ``choice``."""

    family: str
    subtype: str
    text: str
    answer: str
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class Sample:
    """A scene and one question about it; the image is rendered on access (not cached, so that
    large datasets cost only their scene descriptions in memory)."""

    scene: Scene
    question: Question

    @property
    def image(self) -> Image.Image:
        """The rendered scene (:func:`render`)."""
        return render(self.scene)


@dataclass(frozen=True)
class Curriculum:
    """What a difficulty level generates (sizes in pixels, counts inclusive). Families enter at
    fixed difficulties: exists, colour and shape from 0, choice from 0.25, count and position
    from 0.5."""

    max_shapes: int
    max_small: int
    size_range: tuple[int, int]
    small_size_range: tuple[int, int]
    families: tuple[str, ...]


def question_families() -> list[str]:
    """Every question family, in a fixed order."""
    return list(_FAMILIES)


def answer_vocabulary() -> list[str]:
    """Every answer string any question can have, in a fixed order."""
    return ["yes", "no", *COLOUR_NAMES, *KINDS, *NUMBERS, *SIDES, *LETTERS]


def curriculum(difficulty: float, patch: int = 8) -> Curriculum:
    """Scene and family limits at ``difficulty`` (0 easiest, 1 full), linear in between.

    Main shapes are 1.5 to 2.5 patches wide at difficulty 1 and 2.25 to 3 patches at 0 (never
    under 1.5 patches); small shapes are 1 to 1.25 patches wide.
    """
    if not 0.0 <= difficulty <= 1.0:
        raise ValueError(f"difficulty must be in [0, 1], got {difficulty}")
    lo = max(math.ceil(1.5 * patch), math.ceil(patch * (2.25 - 0.75 * difficulty)))
    hi = max(lo, math.floor(patch * (3.0 - 0.5 * difficulty)))
    return Curriculum(
        max_shapes=2 + math.floor(3 * difficulty + 0.5),
        max_small=math.floor(2 * difficulty + 0.5),
        size_range=(lo, hi),
        small_size_range=(patch, patch + patch // 4),
        families=tuple(f for f in _FAMILIES if difficulty >= _FAMILY_FROM[f]),
    )


def generate(
    split: str,
    n: int,
    seed: int,
    image_size: int = 64,
    patch: int = 8,
    difficulty: float = 1.0,
    families: Sequence[str] | None = None,
) -> list[Sample]:
    """``n`` samples of ``split`` (``train``, ``calibration`` or ``test``) for ``seed``.

    ``families`` restricts the families asked (default: those :func:`curriculum` allows at
    ``difficulty``); families are drawn uniformly.
    """
    return [make_sample(split, seed, i, image_size, patch, difficulty, families) for i in range(n)]


def make_sample(
    split: str,
    seed: int,
    index: int,
    image_size: int = 64,
    patch: int = 8,
    difficulty: float = 1.0,
    families: Sequence[str] | None = None,
) -> Sample:
    """Sample ``index`` of ``(split, seed)``: identical to ``generate(split, n, seed, ...)[index]``,
    so a data loader can draw samples on demand. ``image_size`` must be a multiple of ``patch``
    and at least 8 patches."""
    if split not in SPLIT_IDS:
        raise ValueError(f"split must be one of {sorted(SPLIT_IDS)}, got {split!r}")
    for name, value in (("seed", seed), ("index", index)):
        if not 0 <= value < _MAX_UINT32:
            raise ValueError(f"{name} must be in [0, 2**32), got {value}")
    if patch <= 0 or image_size % patch or image_size < _MIN_GRID * patch:
        # Shape sizes are in patches, so a smaller grid cannot hold a full scene.
        raise ValueError(
            f"image_size must be a multiple of patch and at least {_MIN_GRID} patches, got {image_size}/{patch}"
        )
    cur = curriculum(difficulty, patch)
    pool = cur.families if families is None else tuple(families)
    unknown = [f for f in pool if f not in _FAMILIES]
    if unknown or not pool:
        raise ValueError(f"families must be a non-empty subset of {list(_FAMILIES)}, got {list(pool)}")
    rng = np.random.default_rng([SPLIT_IDS[split], seed, index])
    family = pool[int(rng.integers(len(pool)))]
    return _BUILDERS[family](_Draft(rng, cur, image_size, patch))


def to_chat(question: Question) -> str:
    """The user text that follows ``"<image>\\n"`` in the prompt: the question, the options (one
    per line, ``"A. red"``) for ``choice``, and a short answer-format instruction. Kept short so
    that visual tokens dominate the prefill, as in LLaVA."""
    if question.family == "choice":
        lines = [question.text, *(f"{LETTERS[i]}. {o}" for i, o in enumerate(question.options)), _LETTER_INSTRUCTION]
        return "\n".join(lines)
    yes_no = question.family == "exists" or (question.family == "position" and question.subtype == "relation")
    return f"{question.text} {_YES_NO_INSTRUCTION if yes_no else _WORD_INSTRUCTION}"


def render_array(scene: Scene) -> np.ndarray:
    """The scene as ``uint8 [H, W, 3]`` RGB: crisp shapes, no anti-aliasing."""
    palette = np.array([scene.background, *(COLOURS[s.colour] for s in scene.shapes)], dtype=np.uint8)
    return palette[_label_map(scene) + 1]


def render(scene: Scene) -> Image.Image:
    """The scene as an RGB PIL image."""
    return Image.fromarray(render_array(scene), "RGB")


def patch_targets(scene: Scene, image_size: int, patch: int) -> dict[str, np.ndarray]:
    """Dense per-patch supervision for an auxiliary vision loss (teaches the tower to bind colour
    to shape). Arrays have one entry per patch in row-major order, the ViT's token order:

    - ``coverage`` (float32): the share of the patch's pixels covered by shapes;
    - ``covered`` (int64): 1 where ``coverage > 0.5``;
    - ``colour`` / ``kind`` (int64): index into :data:`COLOUR_NAMES` / :data:`KINDS` of the shape
      covering most of the patch, or -1 when no shape covers at least 1/8 of it. A dominant-shape
      rule rather than "the shape under the patch centre": a one-patch shape off the patch grid
      covers no patch centre and would otherwise never be supervised.
    """
    if image_size != scene.image_size or image_size % patch:
        raise ValueError(
            f"image_size {image_size} must equal the scene's ({scene.image_size}) and be a multiple of patch {patch}"
        )
    g = image_size // patch
    labels = _label_map(scene).reshape(g, patch, g, patch)
    # [shapes, g, g] pixel counts; one all-zero row for an empty scene keeps the shapes valid.
    per_shape = np.stack([(labels == i).sum(axis=(1, 3)) for i in range(len(scene.shapes))] or [np.zeros((g, g), int)])
    area = patch * patch
    coverage = (per_shape.sum(0) / area).astype(np.float32).reshape(-1)
    dominant = per_shape.argmax(0).reshape(-1)
    labelled = per_shape.max(0).reshape(-1) >= _LABEL_MIN_FRACTION * area
    colour_ids = np.array([COLOUR_NAMES.index(s.colour) for s in scene.shapes] or [-1])
    kind_ids = np.array([KINDS.index(s.kind) for s in scene.shapes] or [-1])
    return {
        "coverage": coverage,
        "covered": (coverage > 0.5).astype(np.int64),
        "colour": np.where(labelled, colour_ids[dominant], -1).astype(np.int64),
        "kind": np.where(labelled, kind_ids[dominant], -1).astype(np.int64),
    }


def shape_mask(kind: str, size: int) -> np.ndarray:
    """The ``[size, size]`` boolean footprint of ``kind`` in its bounding box (pixel centres)."""
    c = np.arange(size) + 0.5 - size / 2
    u, v = c[None, :], c[:, None]
    h = size / 2
    if kind == "circle":
        return u * u + v * v <= h * h
    if kind == "square":
        return np.ones((size, size), dtype=bool)
    if kind == "triangle":  # apex up, base on the bottom edge
        return np.abs(u) <= (v + h) / 2 + 0.25
    if kind == "cross":  # a plus sign with arms a third of the size thick
        t = size / 6
        return (np.abs(u) <= t) | (np.abs(v) <= t)
    raise ValueError(f"unknown kind {kind!r}")


def _label_map(scene: Scene) -> np.ndarray:
    """``int [H, W]``: the index of the shape drawn at each pixel, -1 for background."""
    labels = np.full((scene.image_size, scene.image_size), -1, dtype=np.int64)
    for i, s in enumerate(scene.shapes):
        x0, y0, x1, y1 = s.box
        region = labels[y0:y1, x0:x1]
        region[shape_mask(s.kind, s.size)] = i
    return labels


class _Draft:
    """A scene being built for one question: geometry first, then attributes that the question
    builder edits to make its question valid and its answer the one it drew."""

    def __init__(self, rng: np.random.Generator, cur: Curriculum, image_size: int, patch: int) -> None:
        self.rng, self.cur, self.image_size, self.patch = rng, cur, image_size, patch
        self.sizes: list[int] = []
        self.corners: list[tuple[int, int]] = []
        self.small: list[bool] = []
        self.kinds: list[str] = []
        self.colours: list[str] = []

    @property
    def max_objects(self) -> int:
        return self.cur.max_shapes + self.cur.max_small

    def place(self, min_objects: int = 1) -> None:
        """A new scene of at least ``min_objects`` shapes, redrawn until its shapes fit (the
        question's targets, drawn before, are kept, so retries do not bias the answers)."""
        for _ in range(_SCENE_TRIES):
            if self._place_once(min_objects):
                return
        raise RuntimeError(f"{min_objects}+ shapes did not fit a {self.image_size}px image in {_SCENE_TRIES} scenes")

    def place_until(self, candidates: Callable[[], list[_T]], min_objects: int = 1) -> list[_T]:
        """Place scenes until ``candidates()`` (what the question needs, e.g. objects on one
        side) is non-empty, and return it."""
        for _ in range(_SCENE_TRIES):
            self.place(min_objects)
            found = candidates()
            if found:
                return found
        raise RuntimeError(f"no scene in {_SCENE_TRIES} offered the question's objects")

    def _place_once(self, min_objects: int) -> bool:
        """Draw sizes and non-overlapping positions (by rejection, largest first), then
        attributes from the prior. False if the shapes did not fit."""
        rng, cur = self.rng, self.cur
        n_small = int(rng.integers(cur.max_small + 1))
        lo = max(1, min_objects - n_small)
        if lo > cur.max_shapes:
            n_small, lo = min_objects - cur.max_shapes, cur.max_shapes
        n_main = int(rng.integers(lo, cur.max_shapes + 1))
        specs = [(int(rng.integers(cur.size_range[0], cur.size_range[1] + 1)), False) for _ in range(n_main)]
        small_lo, small_hi = cur.small_size_range
        specs += [(int(rng.integers(small_lo, small_hi + 1)), True) for _ in range(n_small)]
        specs.sort(key=lambda spec: -spec[0])
        boxes: list[tuple[int, int, int, int]] = []
        for size, _ in specs:
            for _ in range(_PLACEMENT_TRIES):
                x0, y0 = (int(v) for v in rng.integers(1, self.image_size - size, size=2))
                box = (x0, y0, x0 + size, y0 + size)
                if all(_apart(box, other) for other in boxes):
                    boxes.append(box)
                    break
            else:
                return False
        self.sizes = [size for size, _ in specs]
        self.small = [small for _, small in specs]
        self.corners = [(b[0], b[1]) for b in boxes]
        n = len(specs)
        self.kinds = [KINDS[i] for i in rng.choice(len(KINDS), size=n, p=KIND_PRIOR)]
        self.colours = [COLOUR_NAMES[i] for i in rng.choice(len(COLOUR_NAMES), size=n, p=COLOUR_PRIOR)]
        return True

    def centre(self, i: int) -> tuple[float, float]:
        return self.corners[i][0] + self.sizes[i] / 2, self.corners[i][1] + self.sizes[i] / 2

    def uniform(self, values: Sequence[str]) -> str:
        return values[int(self.rng.integers(len(values)))]

    def other(self, values: Sequence[str], prior: Sequence[float], exclude: set[str]) -> str:
        """A value from ``prior`` restricted to values outside ``exclude``."""
        keep = [i for i, v in enumerate(values) if v not in exclude]
        p = np.array([prior[i] for i in keep])
        return values[keep[int(self.rng.choice(len(keep), p=p / p.sum()))]]

    def objects(self) -> set[tuple[str, str]]:
        """The ``(colour, kind)`` pairs present."""
        return set(zip(self.colours, self.kinds))

    def make_unique(self, keep: Sequence[int]) -> None:
        """Recolour objects so that each object in ``keep`` is the only one with its colour and
        kind (``keep`` objects first among themselves, then all others)."""
        taken: set[tuple[str, str]] = set()
        for i in keep:
            if (self.colours[i], self.kinds[i]) in taken:
                self.colours[i] = self.uniform([c for c in COLOUR_NAMES if (c, self.kinds[i]) not in taken])
            taken.add((self.colours[i], self.kinds[i]))
        for j in range(len(self.sizes)):
            if j not in keep and (self.colours[j], self.kinds[j]) in taken:
                self.colours[j] = self.other(COLOUR_NAMES, COLOUR_PRIOR, {c for c, k in taken if k == self.kinds[j]})

    def attribute(self, name: str) -> tuple[list[str], tuple[str, ...], tuple[float, ...]]:
        """The per-object values of ``kind`` or ``colour``, with their names and prior."""
        return (self.kinds, KINDS, KIND_PRIOR) if name == "kind" else (self.colours, COLOUR_NAMES, COLOUR_PRIOR)

    def only_one(self, target: int, attribute: str, value: str) -> None:
        """Set ``attribute`` (``kind`` or ``colour``) of ``target`` to ``value`` and change it on
        every other object that has it."""
        values, names, prior = self.attribute(attribute)
        values[target] = value
        for j in range(len(values)):
            if j != target and values[j] == value:
                values[j] = self.other(names, prior, {value})

    def exactly(self, count: int, attribute: str, value: str) -> None:
        """Make exactly ``count`` objects have ``attribute == value``."""
        values, names, prior = self.attribute(attribute)
        chosen = {int(i) for i in self.rng.choice(len(values), size=count, replace=False)}
        for j in range(len(values)):
            if j in chosen:
                values[j] = value
            elif values[j] == value:
                values[j] = self.other(names, prior, {value})

    def scene(self) -> Scene:
        shapes = tuple(
            Shape(k, c, s, self.centre(i), small)
            for i, (k, c, s, small) in enumerate(zip(self.kinds, self.colours, self.sizes, self.small))
        )
        return Scene(self.image_size, BACKGROUND, shapes)

    def sample(self, family: str, subtype: str, text: str, answer: str, options: tuple[str, ...] = ()) -> Sample:
        return Sample(self.scene(), Question(family, subtype, text, answer, options))


def _apart(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    """Whether two boxes are at least ``_GAP`` pixels apart horizontally or vertically."""
    return a[2] + _GAP <= b[0] or b[2] + _GAP <= a[0] or a[3] + _GAP <= b[1] or b[3] + _GAP <= a[1]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


_POPULAR: tuple[tuple[str, str], ...] = tuple(
    sorted(
        ((c, k) for c in COLOUR_NAMES for k in KINDS),
        key=lambda o: -COLOUR_PRIOR[COLOUR_NAMES.index(o[0])] * KIND_PRIOR[KINDS.index(o[1])],
    )[:POPULAR_COUNT]
)


def _negatives(d: _Draft, subtype: str) -> list[tuple[str, str]]:
    """Absent ``(colour, kind)`` objects of the POPE negative type ``subtype``."""
    present = d.objects()
    absent = [(c, k) for c in COLOUR_NAMES for k in KINDS if (c, k) not in present]
    if subtype == "popular":
        return [o for o in _POPULAR if o not in present]
    if subtype == "adversarial":
        binding = [(c, k) for c, k in absent if c in d.colours and k in d.kinds]
        return binding or [(c, k) for c, k in absent if c in d.colours or k in d.kinds]
    return absent


def _build_exists(d: _Draft) -> Sample:
    subtype = d.uniform(("random", "popular", "adversarial"))
    yes = d.rng.random() < 0.5
    d.place()
    if yes:
        i = int(d.rng.integers(len(d.sizes)))
        colour, kind = d.colours[i], d.kinds[i]
    else:  # never empty: a scene holds fewer objects than POPULAR_COUNT
        pool = _negatives(d, subtype)
        colour, kind = pool[int(d.rng.integers(len(pool)))]
    return d.sample("exists", subtype, f"Is there {_article(colour)} {colour} {kind}?", "yes" if yes else "no")


def _colour_setup(d: _Draft) -> tuple[str, str]:
    """One object of a drawn kind, in a drawn colour: ``(kind, colour)``."""
    kind, colour = d.uniform(KINDS), d.uniform(COLOUR_NAMES)
    d.place()
    i = int(d.rng.integers(len(d.sizes)))
    d.only_one(i, "kind", kind)
    d.colours[i] = colour
    return kind, colour


def _shape_setup(d: _Draft) -> tuple[str, str]:
    """One object of a drawn colour, of a drawn kind: ``(colour, kind)``."""
    colour, kind = d.uniform(COLOUR_NAMES), d.uniform(KINDS)
    d.place()
    i = int(d.rng.integers(len(d.sizes)))
    d.only_one(i, "colour", colour)
    d.kinds[i] = kind
    return colour, kind


def _count_setup(d: _Draft) -> tuple[str, str, int]:
    """A drawn count of objects with a drawn kind or colour: ``(subtype, text, count)``."""
    count = int(d.rng.integers(min(len(NUMBERS) - 1, d.max_objects) + 1))
    subtype = d.uniform(("kind", "colour"))
    value = d.uniform(KINDS if subtype == "kind" else COLOUR_NAMES)
    d.place(min_objects=max(1, count))
    d.exactly(count, subtype, value)
    text = f"How many {PLURALS[value]} are there?" if subtype == "kind" else f"How many {value} objects are there?"
    return subtype, text, count


def _build_colour(d: _Draft) -> Sample:
    kind, colour = _colour_setup(d)
    return d.sample("colour", "", f"What colour is the {kind}?", colour)


def _build_shape(d: _Draft) -> Sample:
    colour, kind = _shape_setup(d)
    return d.sample("shape", "", f"What shape is the {colour} object?", kind)


def _build_count(d: _Draft) -> Sample:
    subtype, text, count = _count_setup(d)
    return d.sample("count", subtype, text, NUMBERS[count])


_RELATIONS = {"left of": (0, -1), "right of": (0, 1), "above": (1, -1), "below": (1, 1)}


def _build_position(d: _Draft) -> Sample:
    if d.rng.random() < 0.5:
        return _build_relation(d)
    return _build_side(d)


def _build_relation(d: _Draft) -> Sample:
    """Yes/no about two objects whose centres are at least a patch apart along the asked axis."""
    word = d.uniform(tuple(_RELATIONS))
    yes = d.rng.random() < 0.5
    axis, sign = _RELATIONS[word]
    want = sign if yes else -sign  # the sign of (a - b) along the axis that gives the answer

    def pairs() -> list[tuple[int, int]]:
        n = len(d.sizes)
        return [
            (a, b) for a in range(n) for b in range(n)
            if a != b and (d.centre(a)[axis] - d.centre(b)[axis]) * want >= d.patch
        ]

    found = d.place_until(pairs, min_objects=2)
    a, b = found[int(d.rng.integers(len(found)))]
    d.make_unique([a, b])
    text = f"Is the {d.colours[a]} {d.kinds[a]} {word} the {d.colours[b]} {d.kinds[b]}?"
    return d.sample("position", "relation", text, "yes" if yes else "no")


def _build_side(d: _Draft) -> Sample:
    """Which half of the image an object is in; its centre is at least a patch from the middle."""
    side = d.uniform(SIDES)
    axis = 0 if side in ("left", "right") else 1
    sign = -1 if side in ("left", "top") else 1
    middle = d.image_size / 2
    pool = d.place_until(lambda: [i for i in range(len(d.sizes)) if (d.centre(i)[axis] - middle) * sign >= d.patch])
    i = pool[int(d.rng.integers(len(pool)))]
    d.make_unique([i])
    where = "on the left or the right" if axis == 0 else "at the top or the bottom"
    return d.sample("position", "side", f"Is the {d.colours[i]} {d.kinds[i]} {where}?", side)


def _lettered(d: _Draft, correct: str, wrong: Sequence[str]) -> tuple[tuple[str, ...], str]:
    """Four options with ``correct`` at a uniformly drawn letter and three of ``wrong`` (in a
    random order) elsewhere: ``(options, letter)``."""
    letter = int(d.rng.integers(len(LETTERS)))
    others = [wrong[i] for i in d.rng.permutation(len(wrong))[: len(LETTERS) - 1]]
    options = others[:letter] + [correct] + others[letter:]
    return tuple(options), LETTERS[letter]


def _build_choice(d: _Draft) -> Sample:
    subtype = d.uniform(("colour", "shape", "count", "object"))
    if subtype == "colour":
        kind, correct = _colour_setup(d)
        text, wrong = f"What colour is the {kind}?", [c for c in COLOUR_NAMES if c != correct]
    elif subtype == "shape":
        colour, correct = _shape_setup(d)
        text, wrong = f"What shape is the {colour} object?", [k for k in KINDS if k != correct]
    elif subtype == "count":
        _, text, count = _count_setup(d)
        correct = NUMBERS[count]
        wrong = [w for w in NUMBERS if w != correct]
    else:
        d.place()
        i = int(d.rng.integers(len(d.sizes)))
        pool = _negatives(d, "adversarial")
        if len(pool) < len(LETTERS) - 1:
            pool = _negatives(d, "random")
        text, correct = "Which object is in the image?", f"{d.colours[i]} {d.kinds[i]}"
        wrong = [f"{c} {k}" for c, k in pool]
    options, letter = _lettered(d, correct, wrong)
    return d.sample("choice", subtype, text, letter, options)


_BUILDERS = {
    "exists": _build_exists,
    "colour": _build_colour,
    "shape": _build_shape,
    "count": _build_count,
    "position": _build_position,
    "choice": _build_choice,
}


@dataclass(frozen=True)
class VQAItem:
    """One ShapesVQA question ready for a prompt template."""

    index: int
    image: Image.Image
    text: str  # :func:`to_chat` of the question (what replaces ``{question}``)
    question: Question


def vqa_items(split: str, seed: int, n: int, image_size: int = 64, patch: int = 8, difficulty: float = 1.0) -> list[VQAItem]:
    """The first ``n`` samples of ``(split, seed)`` as rendered images and prompt texts."""
    out = []
    for i in range(n):
        s = make_sample(split, seed, i, image_size, patch, difficulty)
        out.append(VQAItem(i, render(s.scene), to_chat(s.question), s.question))
    return out
