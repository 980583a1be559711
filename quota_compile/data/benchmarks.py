"""Local copies of six public vision-language benchmarks, in their official file layouts, each
scored with that benchmark's own metric.

Use ``load_benchmark(name, folder)`` to get a :class:`Benchmark`. Its ``items`` hold the prompt
text, the gold answer and a lazy image loader. ``Benchmark.score(predictions)`` turns the model's
raw generated text into the benchmark's metrics. Nothing is downloaded: every benchmark must
already be on disk in the layout described in its loader's docstring.

Prompts follow LLaVA-1.5's evaluation prompts:

* yes/no and short-answer benchmarks (POPE, MME, GQA) end the question with
  ``"Answer the question using a single word or phrase."``;
* multiple-choice benchmarks (ScienceQA-IMG, MMBench, SEED-Bench-IMG) list the options one per
  line as ``"A. ..."`` and end with
  ``"Answer with the option's letter from the given choices directly."``.

How an answer is read from the model's free text (see :func:`extract_yes_no`,
:func:`extract_choice` and :func:`normalize_answer`):

* **yes/no**: the first whole word "yes" or "no", ignoring case and punctuation
  (``"Yes."`` -> yes, ``"No, there is not."`` -> no, ``"There is no dog"`` -> no). If neither
  word appears, the reply has no answer and counts as wrong.
* **option letter**, tried in this order, only letters of the item's own options count:

  1. the whole reply is a letter, in either case, optionally in brackets or followed by
     ``.``, ``)`` or ``:`` (``"B"``, ``"b"``, ``"(B)"``, ``"B."``);
  2. the whole reply equals exactly one option's text after short-answer normalisation
     (``"cat"``, ``"A cat."`` when an option is "cat");
  3. the reply starts with a letter marker: ``"(B) ..."``, ``"B. ..."``, ``"B) ..."``,
     ``"B: ..."`` in either case, or an upper-case letter followed by a space (``"B cat"``);
  4. a phrase such as ``"The answer is B"``, ``"Answer: (B)"`` or ``"option B"`` anywhere in
     the reply (upper-case letter only), as ScienceQA's official scorer does.

  Otherwise the reply has no answer and counts as wrong.
* **short answers** (GQA): lower-case, drop apostrophes, turn other punctuation into spaces,
  drop the articles "a", "an" and "the", collapse whitespace; the whole normalised reply must
  equal the normalised gold answer (GQA's exact match).

Scores are fractions in [0, 1] (papers print them times 100), except MME, whose official score
is in points (up to 2000 for perception and 800 for cognition). Every score dict has ``main``
(the headline number), ``main_metric`` (its name), ``n`` (items scored), ``missing`` (items
without a prediction, counted wrong) and ``unparsed`` (predictions from which no answer could be
read, counted wrong).
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import json
import os
import re
import string
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from PIL import Image, UnidentifiedImageError

from quota_compile.errors import UserError

BENCHMARKS: tuple[str, ...] = ("pope", "mme", "gqa", "scienceqa_img", "mmbench", "seed_bench_img")

SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."
LETTER_ANSWER_PROMPT = "Answer with the option's letter from the given choices directly."

_DISPLAY = {
    "pope": "POPE",
    "mme": "MME",
    "gqa": "GQA",
    "scienceqa_img": "ScienceQA",
    "mmbench": "MMBench",
    "seed_bench_img": "SEED-Bench",
}
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")

MME_PERCEPTION: tuple[str, ...] = (
    "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR",
)
MME_COGNITION: tuple[str, ...] = (
    "commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning",
)


# --------------------------------------------------------------------------------------------
# Items and benchmarks
# --------------------------------------------------------------------------------------------


@dataclass
class Item:
    """One benchmark question.

    ``question`` is the full user text for the model's prompt template (question, options,
    answer instruction); ``answer`` is the gold answer ("yes"/"no", an option letter, or a short
    phrase); ``meta`` holds the benchmark's grouping keys (e.g. ``category``, ``subtask``,
    ``image_id``) and, for multiple choice, ``options`` (letter -> option text) and
    ``answer_type`` ("yes_no", "choice" or "short").
    """

    id: str
    question: str
    answer: str
    meta: dict = field(default_factory=dict)
    image_path: Path | None = field(default=None, repr=False)
    image_b64: str | None = field(default=None, repr=False)
    source: str = field(default="", repr=False)  # where the item came from, for error messages

    def image(self) -> Image.Image:
        """The item's image as RGB, read now (from its file, or decoded from base64)."""
        if self.image_path is not None:
            try:
                with Image.open(self.image_path) as img:
                    return img.convert("RGB")
            except (OSError, UnidentifiedImageError, ValueError):
                raise UserError(f"{self.image_path}: not a readable image file (item {self.id}).") from None
        if self.image_b64 is not None:
            try:
                data = base64.b64decode(self.image_b64, validate=False)
                with Image.open(io.BytesIO(data)) as img:
                    return img.convert("RGB")
            except (binascii.Error, OSError, UnidentifiedImageError, ValueError):
                raise UserError(
                    f"{self.source}: the 'image' field is not a base64-encoded image (item {self.id})."
                ) from None
        raise UserError(f"{self.source or 'benchmark'}: item {self.id} has no image.")


@dataclass
class Benchmark:
    """A loaded benchmark: its name, the folder it was read from and its items in file order."""

    name: str
    path: Path
    items: list[Item]

    def extract(self, item: Item, text: str | None) -> str | None:
        """The answer read from ``text`` for ``item`` (see the module docstring), or None."""
        return extract_answer(item, text)

    def score(self, predictions: dict[str, str]) -> dict:
        """The benchmark's metrics for ``predictions`` (item id -> the model's raw text).

        Returns a JSON-able dict with ``main`` (float), ``main_metric``, ``n``, ``missing``,
        ``unparsed`` and the benchmark's own breakdown. Missing or unreadable predictions count
        as wrong; predictions for ids not in ``items`` are ignored.
        """
        return _SCORERS[self.name](self.items, predictions)


# --------------------------------------------------------------------------------------------
# Answer extraction
# --------------------------------------------------------------------------------------------

_YES_NO = re.compile(r"\b(yes|no)\b")
_ARTICLES = {"a", "an", "the"}
_PUNCT_TO_SPACE = str.maketrans({c: " " for c in string.punctuation if c != "'"} | {"'": None})
_LETTER_ONLY = re.compile(r"\(?([A-Za-z])\)?[.:)]?")
_LETTER_LEAD = re.compile(r"\(([A-Za-z])\)|([A-Za-z])[.):](?=\s|$)|([A-Z])(?=\s)")
_LETTER_PHRASE = re.compile(r"\b(?i:answer|option|choice)(?:\s+(?i:is))?\s*:?\s*\(?([A-Z])\)?(?![A-Za-z])")


def extract_yes_no(text: str | None) -> str | None:
    """"yes" or "no": the first of these whole words in ``text`` (any case), else None."""
    if not text:
        return None
    m = _YES_NO.search(text.lower())
    return m.group(1) if m else None


def normalize_answer(text: str | None) -> str:
    """Short-answer normalisation: lower-case, no apostrophes, other punctuation to spaces,
    no articles (a, an, the), single spaces."""
    if not text:
        return ""
    words = text.lower().translate(_PUNCT_TO_SPACE).split()
    return " ".join(w for w in words if w not in _ARTICLES)


def extract_choice(text: str | None, options: dict[str, str]) -> str | None:
    """The option letter (a key of ``options``) that ``text`` picks, else None.

    Rules, in order: the reply is just a letter ("B", "b", "(B)", "B."); the reply equals one
    option's text after :func:`normalize_answer`; the reply starts with a letter marker ("(B) ...",
    "B. ...", "B) ...", "B: ...", or "B ..." upper-case); a phrase "answer is B" / "Answer: B" /
    "option B" anywhere (upper-case letter).
    """
    if not text:
        return None
    t = text.strip()
    m = _LETTER_ONLY.fullmatch(t)
    if m and m.group(1).upper() in options:
        return m.group(1).upper()
    norm = normalize_answer(t)
    if norm:
        hits = [k for k, v in options.items() if normalize_answer(v) == norm]
        if len(hits) == 1:
            return hits[0]
    m = _LETTER_LEAD.match(t)
    if m:
        letter = next(g for g in m.groups() if g).upper()
        if letter in options:
            return letter
    for m in _LETTER_PHRASE.finditer(t):
        if m.group(1) in options:
            return m.group(1)
    return None


def extract_answer(item: Item, text: str | None) -> str | None:
    """The answer read from ``text`` in the form of ``item.answer``, or None if none is found."""
    kind = item.meta.get("answer_type")
    if kind == "yes_no":
        return extract_yes_no(text)
    if kind == "choice":
        return extract_choice(text, item.meta["options"])
    norm = normalize_answer(text)
    return norm or None


def _is_correct(item: Item, extracted: str | None) -> bool:
    if extracted is None:
        return False
    if item.meta.get("answer_type") == "short":
        return extracted == normalize_answer(item.answer)
    return extracted == item.answer


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_benchmark(name: str, path: str | Path, limit: int | None = None) -> Benchmark:
    """Load benchmark ``name`` (one of :data:`BENCHMARKS`) from the folder ``path``.

    ``limit`` keeps the first N items in file order. Image files are checked to exist now;
    images are read only by :meth:`Item.image`. Every problem with the input raises
    :class:`UserError` (``quota-compile eval`` names the key ``eval.benchmarks.{name}`` and the
    file in front of it).
    """
    if name not in _LOADERS:
        raise UserError(f"unknown benchmark '{name}' (expected one of: {', '.join(BENCHMARKS)}).")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise UserError(f"limit must be a positive whole number, got {limit!r}.")
    folder = Path(path)
    items = _LOADERS[name](folder, limit)
    if not items:
        raise UserError(f"{folder}: no {_DISPLAY[name]} items found (expected the benchmark's test questions).")
    _check_unique(items, folder)
    return Benchmark(name=name, path=folder, items=items)


def _fail(message: str) -> UserError:
    return UserError(message)


def _require_folder(folder: Path, what: str) -> Path:
    if not folder.exists():
        raise _fail(f"{folder}: no such folder (expected {what}).")
    if not folder.is_dir():
        raise _fail(f"{folder}: not a folder (expected {what}).")
    return folder


def _read_text(file: Path, what: str) -> str:
    if not file.is_file():
        raise _fail(f"{file}: no such file (expected {what}).")
    data = file.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise _fail(f"{file}: not a UTF-8 text file (expected {what}).") from None


def _read_json(file: Path, what: str) -> Any:
    text = _read_text(file, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise _fail(f"{file}: not valid JSON at line {e.lineno} ({e.msg}; expected {what}).") from None


def _check_unique(items: list[Item], folder: Path) -> None:
    seen: dict[str, str] = {}
    for it in items:
        if it.id in seen:
            raise _fail(f"{it.source or folder}: question id '{it.id}' appears twice (expected unique ids).")
        seen[it.id] = it.source


def _key(record: dict, key: str, where: str, expected: str) -> Any:
    if key not in record:
        raise _fail(f"{where} has no key '{key}' (expected {expected}).")
    return record[key]


def _text(value: Any, where: str, key: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise _fail(f"{where}: key '{key}' must be text, got {type(value).__name__}.")
    return str(value)


class _ImageDir:
    """The files of one image folder, listed once, so checking thousands of items is cheap."""

    def __init__(self, folders: Iterable[Path]):
        self.folders = [f for f in folders if f.is_dir()]
        self._names: list[set[str]] = [set(os.listdir(f)) for f in self.folders]

    def find(self, name: str, try_suffixes: bool = False) -> Path | None:
        for folder, names in zip(self.folders, self._names):
            if name in names:
                return folder / name
            if try_suffixes and not Path(name).suffix:
                for suf in _IMAGE_SUFFIXES:
                    if name + suf in names:
                        return folder / (name + suf)
        return None

    def describe(self) -> str:
        return " or ".join(str(f) for f in self.folders)


def _lettered(question: str, options: dict[str, str]) -> str:
    lines = [question] + [f"{k}. {v}" for k, v in options.items()] + [LETTER_ANSWER_PROMPT]
    return "\n".join(lines)


def _missing_value(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and value != value:
        return True
    return isinstance(value, str) and value.strip().lower() in ("", "nan", "none", "null")


# ---- POPE -----------------------------------------------------------------------------------

_POPE_ORDER = ("random", "popular", "adversarial")
_POPE_EXPECT = "a POPE record with question_id, image, text and label"


def _pope_records(file: Path) -> Iterator[tuple[int, Any]]:
    text = _read_text(file, "the POPE annotation file, one JSON record per line")
    if text.lstrip().startswith("["):  # a JSON array instead of JSON Lines: accept it too
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise _fail(f"{file}: not valid JSON at line {e.lineno} (expected one POPE record per line).") from None
        for i, rec in enumerate(data, 1):
            yield i, rec
        return
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError:
            raise _fail(f"{file}: line {lineno} is not valid JSON (expected one POPE record per line).") from None


def load_pope(folder: Path, limit: int | None = None) -> list[Item]:
    """POPE as laid out for LLaVA / lmms-eval: ``coco_pope_{random,popular,adversarial}.json``
    (JSON Lines, keys ``question_id``, ``image``, ``text``, ``label`` yes/no) in ``folder``, the
    COCO val2014 images in ``folder/images/`` or ``folder/val2014/``.

    Files are read in the order random, popular, adversarial (then any other
    ``coco_pope_*.json`` by name); item ids are ``"{subset}/{question_id}"``.
    """
    _require_folder(folder, "the POPE folder with coco_pope_*.json files")
    files = list(folder.glob("coco_pope_*.json"))
    if not files:
        raise _fail(f"{folder}: no coco_pope_*.json file (expected the POPE annotation files).")

    def order(f: Path) -> tuple[int, str]:
        sub = f.stem[len("coco_pope_"):]
        return (_POPE_ORDER.index(sub) if sub in _POPE_ORDER else len(_POPE_ORDER), sub)

    files.sort(key=order)
    images = _ImageDir([folder / "images", folder / "val2014"])
    if not images.folders:
        raise _fail(f"{folder}: no images/ or val2014/ folder (expected the COCO val2014 images POPE refers to).")
    items: list[Item] = []
    for file in files:
        subset = file.stem[len("coco_pope_"):]
        for lineno, rec in _pope_records(file):
            where = f"{file}: line {lineno}"
            if not isinstance(rec, dict):
                raise _fail(f"{where} is not a JSON object (expected {_POPE_EXPECT}).")
            qid = _text(_key(rec, "question_id", where, _POPE_EXPECT), where, "question_id")
            image = _text(_key(rec, "image", where, _POPE_EXPECT), where, "image")
            text = _text(_key(rec, "text", where, _POPE_EXPECT), where, "text")
            label = _text(_key(rec, "label", where, _POPE_EXPECT), where, "label").strip().lower()
            if label not in ("yes", "no"):
                raise _fail(f"{where}: key 'label' must be 'yes' or 'no', got {rec['label']!r}.")
            img = images.find(image)
            if img is None:
                raise _fail(f"{where}: image {image} is not in {images.describe()} (expected the COCO val2014 image).")
            items.append(Item(
                id=f"{subset}/{qid}",
                question=f"{text.strip()}\n{SHORT_ANSWER_PROMPT}",
                answer=label,
                meta={"answer_type": "yes_no", "subset": subset, "category": subset, "image_id": image,
                      "question_id": qid},
                image_path=img,
                source=where,
            ))
            if limit is not None and len(items) >= limit:
                return items
    return items


# ---- MME ------------------------------------------------------------------------------------


def _mme_subtasks(folder: Path) -> list[tuple[str, Path]]:
    children = {p.name.lower(): p for p in folder.iterdir() if p.is_dir()}
    found = [(name, children[name.lower()]) for name in MME_PERCEPTION + MME_COGNITION if name.lower() in children]
    return found


def load_mme(folder: Path, limit: int | None = None) -> list[Item]:
    """MME as released (``MME_Benchmark_release_version``): one folder per subtask in
    ``folder`` (a single ``MME_Benchmark_release_version/`` or ``MME_Benchmark/`` folder inside
    it is entered). A subtask folder holds either ``images/`` and
    ``questions_answer_YES_or_NO/`` (one ``.txt`` per image) or images next to same-named
    ``.txt`` files; each ``.txt`` line is ``question<TAB>Yes|No``.

    Subtasks are read in the order of :data:`MME_PERCEPTION` then :data:`MME_COGNITION`, files
    by name; item ids are ``"{subtask}/{image stem}/{line index}"``.
    """
    _require_folder(folder, "the MME_Benchmark_release_version folder")
    subtasks = _mme_subtasks(folder)
    if not subtasks:
        for inner in ("MME_Benchmark_release_version", "MME_Benchmark"):
            if (folder / inner).is_dir() and _mme_subtasks(folder / inner):
                folder = folder / inner
                subtasks = _mme_subtasks(folder)
                break
    if not subtasks:
        raise _fail(
            f"{folder}: no MME subtask folder (expected folders such as existence/, count/, OCR/ or "
            f"code_reasoning/ from MME_Benchmark_release_version)."
        )
    items: list[Item] = []
    for name, sub in subtasks:
        qa_dir = sub / "questions_answer_YES_or_NO"
        if qa_dir.is_dir():
            txts = sorted(qa_dir.glob("*.txt"))
            img_dir = sub / "images"
            if not img_dir.is_dir():
                raise _fail(f"{sub}: has questions_answer_YES_or_NO/ but no images/ folder (expected the subtask's images).")
        else:
            txts = sorted(sub.glob("*.txt"))
            img_dir = sub
        if not txts:
            raise _fail(
                f"{sub}: no question .txt files (expected questions_answer_YES_or_NO/*.txt or a .txt next to each image)."
            )
        by_stem: dict[str, Path] = {}
        for p in sorted(img_dir.iterdir()):
            if p.suffix.lower() in _IMAGE_SUFFIXES:
                by_stem.setdefault(p.stem, p)
        category = "perception" if name in MME_PERCEPTION else "cognition"
        for txt in txts:
            img = by_stem.get(txt.stem)
            if img is None:
                raise _fail(f"{txt}: no image named {txt.stem}.jpg or .png in {img_dir} (expected one image per question file).")
            raw = txt.read_bytes()
            try:
                text = raw.decode("utf-8-sig")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")
            k = 0
            for lineno, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                parts = line.strip().rsplit("\t", 1)
                if len(parts) != 2:
                    raise _fail(f"{txt}: line {lineno} has no tab (expected 'question<TAB>Yes' or 'question<TAB>No').")
                question, answer = parts[0].strip(), parts[1].strip().lower()
                if answer not in ("yes", "no"):
                    raise _fail(f"{txt}: line {lineno} has answer {parts[1].strip()!r} (expected Yes or No after the tab).")
                items.append(Item(
                    id=f"{name}/{txt.stem}/{k}",
                    question=f"{question}\n{SHORT_ANSWER_PROMPT}",
                    answer=answer,
                    meta={"answer_type": "yes_no", "subtask": name, "category": category, "image_id": img.name},
                    image_path=img,
                    source=f"{txt}: line {lineno}",
                ))
                k += 1
                if limit is not None and len(items) >= limit:
                    return items
            if k == 0:
                raise _fail(f"{txt}: no questions (expected lines 'question<TAB>Yes|No').")
    return items


# ---- GQA ------------------------------------------------------------------------------------

_GQA_EXPECT = "a GQA question with imageId, question and answer"


def load_gqa(folder: Path, limit: int | None = None) -> list[Item]:
    """GQA test-dev balanced: ``folder/testdev_balanced_questions.json`` (question id ->
    record with ``imageId``, ``question``, ``answer``, ``types`` ...) and the images at
    ``folder/images/{imageId}.jpg``. Items keep the file's order; ids are the question ids.
    """
    _require_folder(folder, "the GQA folder with testdev_balanced_questions.json")
    file = folder / "testdev_balanced_questions.json"
    data = _read_json(file, "the GQA questions: a JSON object of question id -> question")
    if not isinstance(data, dict):
        raise _fail(f"{file}: top level is a {type(data).__name__} (expected an object of question id -> question).")
    images = _ImageDir([folder / "images"])
    if not images.folders:
        raise _fail(f"{folder}: no images/ folder (expected the GQA images as images/{{imageId}}.jpg).")
    items: list[Item] = []
    for qid, rec in data.items():
        where = f"{file}: question '{qid}'"
        if not isinstance(rec, dict):
            raise _fail(f"{where} is not a JSON object (expected {_GQA_EXPECT}).")
        image_id = _text(_key(rec, "imageId", where, _GQA_EXPECT), where, "imageId")
        question = _text(_key(rec, "question", where, _GQA_EXPECT), where, "question")
        answer = _text(_key(rec, "answer", where, _GQA_EXPECT), where, "answer")
        img = images.find(f"{image_id}.jpg") or images.find(image_id, try_suffixes=True)
        if img is None:
            raise _fail(f"{where}: image {image_id}.jpg is not in {images.describe()} (expected the GQA image).")
        types = rec.get("types") if isinstance(rec.get("types"), dict) else {}
        meta = {"answer_type": "short", "image_id": image_id}
        for k in ("structural", "semantic", "detailed"):
            if isinstance(types.get(k), str):
                meta[k] = types[k]
        meta["category"] = meta.get("structural", "")
        items.append(Item(
            id=str(qid), question=f"{question.strip()}\n{SHORT_ANSWER_PROMPT}", answer=answer, meta=meta,
            image_path=img, source=where,
        ))
        if limit is not None and len(items) >= limit:
            break
    return items


# ---- ScienceQA-IMG --------------------------------------------------------------------------

_SQA_EXPECT = "a ScienceQA problem with question, choices, answer and image"


def load_scienceqa_img(folder: Path, limit: int | None = None) -> list[Item]:
    """ScienceQA, image subset of the test split: ``folder/problems.json`` (pid -> problem with
    ``question``, ``choices``, ``answer`` (index), ``hint``, ``image``, ``subject`` ...),
    ``folder/pid_splits.json`` (``{"test": [pid, ...], ...}``) and the images at
    ``folder/images/test/{pid}/{image}`` (``image.png``).

    Only test problems whose ``image`` is set are kept, in ``pid_splits["test"]`` order. The
    prompt is ``"Context: {hint}\\n"`` (when the hint is not empty), the question, the lettered
    options and the letter instruction.
    """
    _require_folder(folder, "the ScienceQA folder with problems.json and pid_splits.json")
    pfile, sfile = folder / "problems.json", folder / "pid_splits.json"
    problems = _read_json(pfile, "the ScienceQA problems: a JSON object of pid -> problem")
    splits = _read_json(sfile, 'the ScienceQA splits: a JSON object like {"test": [pid, ...]}')
    if not isinstance(problems, dict):
        raise _fail(f"{pfile}: top level is a {type(problems).__name__} (expected an object of pid -> problem).")
    if not isinstance(splits, dict) or "test" not in splits:
        raise _fail(f"{sfile}: no key 'test' (expected an object like {{\"test\": [pid, ...]}}).")
    if not isinstance(splits["test"], list):
        raise _fail(f"{sfile}: key 'test' must be a list of problem ids.")
    items: list[Item] = []
    for pid in splits["test"]:
        pid = str(pid)
        if pid not in problems:
            raise _fail(f"{sfile}: test problem '{pid}' is not in {pfile.name} (expected every test pid to be a problem).")
        rec = problems[pid]
        where = f"{pfile}: problem '{pid}'"
        if not isinstance(rec, dict):
            raise _fail(f"{where} is not a JSON object (expected {_SQA_EXPECT}).")
        image = rec.get("image")
        if _missing_value(image):
            continue
        image = _text(image, where, "image")
        question = _text(_key(rec, "question", where, _SQA_EXPECT), where, "question")
        choices = _key(rec, "choices", where, _SQA_EXPECT)
        answer = _key(rec, "answer", where, _SQA_EXPECT)
        if not isinstance(choices, list) or not choices or len(choices) > 26:
            raise _fail(f"{where}: key 'choices' must be a non-empty list of option texts.")
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise _fail(f"{where}: key 'answer' must be an index into 'choices' (0 to {len(choices) - 1}), got {answer!r}.")
        options = {chr(ord("A") + i): _text(c, where, "choices") for i, c in enumerate(choices)}
        img = folder / "images" / "test" / pid / image
        if not img.is_file():
            raise _fail(f"{where}: image {img} does not exist (expected images/test/{pid}/{image}).")
        hint = rec.get("hint")
        hint = "" if _missing_value(hint) else str(hint).strip()
        body = f"Context: {hint}\n{question.strip()}" if hint else question.strip()
        meta = {"answer_type": "choice", "options": options, "image_id": pid}
        for k in ("subject", "topic", "category", "grade", "skill"):
            if isinstance(rec.get(k), str):
                meta[k] = rec[k]
        items.append(Item(
            id=pid, question=_lettered(body, options), answer=chr(ord("A") + answer), meta=meta,
            image_path=img, source=where,
        ))
        if limit is not None and len(items) >= limit:
            break
    return items


# ---- MMBench --------------------------------------------------------------------------------

_MMB_COLUMNS = "index, question, hint, A, B, C, D, answer, category, image"


def _set_csv_limit() -> None:
    limit = 2**31 - 1
    if csv.field_size_limit() < limit:
        csv.field_size_limit(limit)  # base64 images exceed csv's default 128 KiB field limit


def load_mmbench(folder: Path, limit: int | None = None) -> list[Item]:
    """MMBench as released (e.g. ``mmbench_dev_20230712.tsv``): the single ``*.tsv`` in
    ``folder`` (or ``folder`` itself if it is a .tsv file), tab-separated with a header row and
    columns ``index, question, hint, A, B, C, D, answer, category, image`` (base64). ``hint``
    and options C/D (and E, if present) may be empty or "nan". An ``image`` that is a short
    number refers to the row with that index (as in VLMEvalKit's TSVs).

    Scored in a single pass over the rows as given. The official CircularEval (each question
    asked once per rotation of its options, right only if right every time) is not done here,
    so accuracy is higher than the leaderboard's CircularEval numbers. The prompt is the hint
    (if any) and the question on separate lines, the lettered options and the letter
    instruction, as LLaVA-1.5 does. Item ids are the ``index`` column.
    """
    if folder.is_file() and folder.suffix.lower() == ".tsv":
        tsv = folder
    else:
        _require_folder(folder, "the MMBench folder with one .tsv file")
        tsvs = sorted(folder.glob("*.tsv"))
        if not tsvs:
            raise _fail(f"{folder}: no .tsv file (expected the MMBench TSV, e.g. mmbench_dev_20230712.tsv).")
        if len(tsvs) > 1:
            names = ", ".join(t.name for t in tsvs)
            raise _fail(f"{folder}: several .tsv files ({names}); expected exactly one MMBench TSV.")
        tsv = tsvs[0]
    _set_csv_limit()
    text = _read_text(tsv, "the MMBench TSV")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t")
    header = next(reader, None)
    if not header:
        raise _fail(f"{tsv}: empty file (expected a header row with columns {_MMB_COLUMNS}).")
    col = {h.strip(): i for i, h in enumerate(header)}
    for need in ("index", "question", "A", "B", "answer", "image"):
        if need not in col:
            extra = " (the test split has no answers; use the dev split)" if need == "answer" else ""
            raise _fail(f"{tsv}: no '{need}' column{extra} (expected columns {_MMB_COLUMNS}).")
    letters = [c for c in "ABCDE" if c in col]

    def cell(row: list[str], name: str) -> str:
        i = col.get(name)
        return row[i] if i is not None and i < len(row) else ""

    images_by_index: dict[str, str] = {}
    items: list[Item] = []
    refs: list[tuple[Item, str, str]] = []
    for row in reader:
        if not any(c.strip() for c in row):
            continue
        where = f"{tsv}: line {reader.line_num}"
        idx = cell(row, "index").strip()
        if not idx:
            raise _fail(f"{where} has an empty 'index' (expected a question index).")
        image = cell(row, "image").strip()
        images_by_index[idx] = image
        if limit is not None and len(items) >= limit:
            # past the limit: read on only to find images that kept rows refer to
            if all(ref in images_by_index for _, ref, _ in refs):
                break
            continue
        where = f"{tsv}: row with index {idx}"
        question = cell(row, "question").strip()
        if not question:
            raise _fail(f"{where} has an empty 'question' (expected the question text).")
        options = {c: cell(row, c).strip() for c in letters if not _missing_value(cell(row, c))}
        if len(options) < 2:
            raise _fail(f"{where} has fewer than two options (expected options in columns A and B at least).")
        answer = cell(row, "answer").strip().upper()
        if answer not in options:
            raise _fail(f"{where}: 'answer' is {cell(row, 'answer')!r} (expected the letter of one of its options {', '.join(options)}).")
        if not image:
            raise _fail(f"{where} has an empty 'image' (expected a base64-encoded image).")
        hint = cell(row, "hint")
        body = question if _missing_value(hint) else f"{hint.strip()}\n{question}"
        meta = {"answer_type": "choice", "options": options, "image_id": idx}
        for k in ("category", "l2-category", "source", "split"):
            v = cell(row, k)
            if not _missing_value(v):
                meta[k] = v.strip()
        meta.setdefault("category", "")
        item = Item(id=idx, question=_lettered(body, options), answer=answer, meta=meta, source=where)
        if len(image) <= 64 and image.isdigit():
            refs.append((item, image, where))
        else:
            item.image_b64 = image
        items.append(item)
        if limit is not None and len(items) >= limit and all(ref in images_by_index for _, ref, _ in refs):
            break
    for item, ref, where in refs:
        target = images_by_index.get(ref)
        if target is None or (len(target) <= 64 and target.isdigit()):
            raise _fail(f"{where}: 'image' refers to row index {ref}, which has no image (expected base64 image data).")
        item.image_b64 = target
    return items


# ---- SEED-Bench-IMG -------------------------------------------------------------------------

_SEED_EXPECT = "a SEED-Bench question with question_id, data_id, question, choice_a..choice_d, answer, data_type"


def load_seed_bench_img(folder: Path, limit: int | None = None) -> list[Item]:
    """SEED-Bench (v1), image questions: ``folder/SEED-Bench.json`` with
    ``{"questions": [{question_id, data_id, question, choice_a..choice_d, answer, data_type,
    question_type_id}, ...], "question_type": {name: id}}`` and the images in
    ``folder/SEED-Bench-image/{data_id}`` (an extension is tried if ``data_id`` has none).
    Only ``data_type == "image"`` questions are kept, in file order; ids are the question ids.
    """
    _require_folder(folder, "the SEED-Bench folder with SEED-Bench.json")
    file = folder / "SEED-Bench.json"
    data = _read_json(file, 'the SEED-Bench annotations: {"questions": [...], "question_type": {...}}')
    if not isinstance(data, dict) or not isinstance(data.get("questions"), list):
        raise _fail(f"{file}: no key 'questions' with a list (expected the SEED-Bench annotation file).")
    qtypes = data.get("question_type") if isinstance(data.get("question_type"), dict) else {}
    type_names = {str(v): str(k) for k, v in qtypes.items()}
    images = _ImageDir([folder / "SEED-Bench-image"])
    if not images.folders:
        raise _fail(f"{folder}: no SEED-Bench-image/ folder (expected the SEED-Bench images).")
    items: list[Item] = []
    for i, rec in enumerate(data["questions"]):
        where = f"{file}: questions[{i}]"
        if not isinstance(rec, dict):
            raise _fail(f"{where} is not a JSON object (expected {_SEED_EXPECT}).")
        if _key(rec, "data_type", where, _SEED_EXPECT) != "image":
            continue
        qid = _text(_key(rec, "question_id", where, _SEED_EXPECT), where, "question_id")
        where = f"{file}: question_id '{qid}'"
        data_id = _text(_key(rec, "data_id", where, _SEED_EXPECT), where, "data_id")
        question = _text(_key(rec, "question", where, _SEED_EXPECT), where, "question")
        options = {
            c.upper(): _text(_key(rec, f"choice_{c}", where, _SEED_EXPECT), where, f"choice_{c}").strip()
            for c in "abcd"
        }
        answer = _text(_key(rec, "answer", where, _SEED_EXPECT), where, "answer").strip().upper()
        if answer not in options:
            raise _fail(f"{where}: key 'answer' is {rec['answer']!r} (expected A, B, C or D).")
        type_id = str(_key(rec, "question_type_id", where, _SEED_EXPECT))
        img = images.find(data_id, try_suffixes=True)
        if img is None:
            raise _fail(f"{where}: image {data_id} is not in {images.describe()} (expected the SEED-Bench image).")
        items.append(Item(
            id=qid, question=_lettered(question.strip(), options), answer=answer,
            meta={"answer_type": "choice", "options": options, "image_id": data_id,
                  "question_type_id": type_id, "question_type": type_names.get(type_id, type_id),
                  "category": type_names.get(type_id, type_id)},
            image_path=img, source=where,
        ))
        if limit is not None and len(items) >= limit:
            break
    return items


_LOADERS: dict[str, Callable[[Path, int | None], list[Item]]] = {
    "pope": load_pope,
    "mme": load_mme,
    "gqa": load_gqa,
    "scienceqa_img": load_scienceqa_img,
    "mmbench": load_mmbench,
    "seed_bench_img": load_seed_bench_img,
}


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


def _ratio(num: int, den: int) -> float:
    return float(num) / den if den else 0.0


def _judge(items: list[Item], predictions: dict[str, str]) -> tuple[list[str | None], int, int]:
    """Extracted answers (None when missing or unreadable), missing count, unparsed count."""
    out: list[str | None] = []
    missing = unparsed = 0
    for it in items:
        text = predictions.get(it.id)
        if text is None:
            missing += 1
            out.append(None)
            continue
        ans = extract_answer(it, text)
        if ans is None:
            unparsed += 1
        out.append(ans)
    return out, missing, unparsed


def _pope_metrics(golds: list[str], preds: list[str | None]) -> dict:
    tp = sum(g == "yes" and p == "yes" for g, p in zip(golds, preds))
    fp = sum(g == "no" and p == "yes" for g, p in zip(golds, preds))
    tn = sum(g == "no" and p == "no" for g, p in zip(golds, preds))
    fn = sum(g == "yes" and p != "yes" for g, p in zip(golds, preds))
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": _ratio(tp + tn, len(golds)), "precision": precision, "recall": recall, "f1": f1,
        "yes_ratio": _ratio(sum(p == "yes" for p in preds), len(golds)),
        "tp": tp, "fp": fp, "tn": tn, "fn": fn, "n": len(golds),
    }


def score_pope(items: list[Item], predictions: dict[str, str]) -> dict:
    """POPE: accuracy, precision, recall, F1 (positive class "yes") and yes-ratio per subset and
    over all items. A reply with neither yes nor no is wrong: a false negative on a "yes"
    question, neither a false positive nor a true negative on a "no" one. ``main`` is the mean F1
    over the subsets present."""
    preds, missing, unparsed = _judge(items, predictions)
    groups: dict[str, list[int]] = defaultdict(list)
    for i, it in enumerate(items):
        groups[it.meta["subset"]].append(i)
    subsets = {s: _pope_metrics([items[i].answer for i in idx], [preds[i] for i in idx]) for s, idx in groups.items()}
    overall = _pope_metrics([it.answer for it in items], preds)
    main = sum(m["f1"] for m in subsets.values()) / len(subsets) if subsets else 0.0
    return {"main": main, "main_metric": "f1 (mean over subsets)", "n": len(items), "missing": missing,
            "unparsed": unparsed, "subsets": subsets, "overall": overall}


def score_mme(items: list[Item], predictions: dict[str, str]) -> dict:
    """MME: per subtask acc (share of questions right), acc+ (share of images with all their
    questions right) and score = 100 * (acc + acc+); ``perception`` and ``cognition`` are the
    sums of the subtask scores present; ``main`` is their sum."""
    preds, missing, unparsed = _judge(items, predictions)
    per: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for it, p in zip(items, preds):
        per[it.meta["subtask"]][it.meta["image_id"]].append(_is_correct(it, p))
    subtasks: dict[str, dict] = {}
    totals = {"perception": 0.0, "cognition": 0.0}
    for name, images in per.items():
        answers = [ok for oks in images.values() for ok in oks]
        acc = _ratio(sum(answers), len(answers))
        acc_plus = _ratio(sum(all(oks) for oks in images.values()), len(images))
        score = 100.0 * (acc + acc_plus)
        category = "perception" if name in MME_PERCEPTION else "cognition"
        totals[category] += score
        subtasks[name] = {"category": category, "acc": acc, "acc_plus": acc_plus, "score": score,
                          "n": len(answers), "images": len(images)}
    return {"main": totals["perception"] + totals["cognition"], "main_metric": "mme score (perception + cognition)",
            "n": len(items), "missing": missing, "unparsed": unparsed,
            "perception": totals["perception"], "cognition": totals["cognition"], "subtasks": subtasks}


def _accuracy_by(items: list[Item], predictions: dict[str, str], key: str, label: str) -> dict:
    preds, missing, unparsed = _judge(items, predictions)
    right = [_is_correct(it, p) for it, p in zip(items, preds)]
    groups: dict[str, list[bool]] = defaultdict(list)
    for it, ok in zip(items, right):
        if it.meta.get(key):
            groups[str(it.meta[key])].append(ok)
    acc = _ratio(sum(right), len(items))
    return {"main": acc, "main_metric": "accuracy", "n": len(items), "missing": missing, "unparsed": unparsed,
            "accuracy": acc, label: {g: {"accuracy": _ratio(sum(v), len(v)), "n": len(v)} for g, v in groups.items()}}


def score_gqa(items: list[Item], predictions: dict[str, str]) -> dict:
    """GQA: exact-match accuracy after :func:`normalize_answer`, also per structural type."""
    return _accuracy_by(items, predictions, "structural", "by_structural_type")


def score_scienceqa_img(items: list[Item], predictions: dict[str, str]) -> dict:
    """ScienceQA-IMG: accuracy of the option letter, also per subject."""
    return _accuracy_by(items, predictions, "subject", "by_subject")


def score_mmbench(items: list[Item], predictions: dict[str, str]) -> dict:
    """MMBench: single-pass accuracy of the option letter (no CircularEval), also per category."""
    return _accuracy_by(items, predictions, "category", "by_category")


def score_seed_bench_img(items: list[Item], predictions: dict[str, str]) -> dict:
    """SEED-Bench-IMG: accuracy of the option letter, also per question type."""
    return _accuracy_by(items, predictions, "question_type", "by_question_type")


_SCORERS: dict[str, Callable[[list[Item], dict[str, str]], dict]] = {
    "pope": score_pope,
    "mme": score_mme,
    "gqa": score_gqa,
    "scienceqa_img": score_scienceqa_img,
    "mmbench": score_mmbench,
    "seed_bench_img": score_seed_bench_img,
}
