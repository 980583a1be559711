"""Benchmark loaders and metrics, on tiny fixtures written in each benchmark's official layout."""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from quota_compile.commands.evaluate import load_benchmarks
from quota_compile.config import parse_config
from quota_compile.data.benchmarks import (
    BENCHMARKS,
    LETTER_ANSWER_PROMPT,
    SHORT_ANSWER_PROMPT,
    Benchmark,
    Item,
    extract_choice,
    extract_yes_no,
    load_benchmark,
    normalize_answer,
)
from quota_compile.errors import UserError, errors_in


# --------------------------------------------------------------------------------------------
# Fixture writers
# --------------------------------------------------------------------------------------------


def write_image(path: Path, color=(200, 30, 30), size=(4, 3)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "PNG" if path.suffix.lower() == ".png" else "JPEG"
    Image.new("RGB", size, color).save(path, fmt)
    return path


def png_b64(color=(10, 200, 10), size=(5, 2)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


COCO = "COCO_val2014_{:012d}.jpg"


def write_pope(root: Path, image_dir: str = "images") -> Path:
    """random: 4 questions (yes, yes, no, no); adversarial: 2 (yes, no)."""
    root.mkdir(parents=True, exist_ok=True)
    for i in (1, 2, 3):
        write_image(root / image_dir / COCO.format(i))
    write_jsonl(root / "coco_pope_random.json", [
        {"question_id": 1, "image": COCO.format(1), "text": "Is there a dog in the image?", "label": "yes"},
        {"question_id": 2, "image": COCO.format(1), "text": "Is there a cat in the image?", "label": "yes"},
        {"question_id": 3, "image": COCO.format(2), "text": "Is there a car in the image?", "label": "no"},
        {"question_id": 4, "image": COCO.format(2), "text": "Is there a bus in the image?", "label": "no"},
    ])
    # written second but read second only because of the official subset order
    write_jsonl(root / "coco_pope_adversarial.json", [
        {"question_id": 1, "image": COCO.format(3), "text": "Is there a fork in the image?", "label": "yes"},
        {"question_id": 2, "image": COCO.format(3), "text": "Is there a knife in the image?", "label": "no"},
    ])
    return root


def write_mme(root: Path) -> Path:
    """existence (flat: 2 images), artwork (images/ + questions_answer_YES_or_NO/: 1 image),
    code_reasoning (flat: 1 image); 2 questions per image, first Yes, second No."""
    ex = root / "existence"
    write_image(ex / "000000006040.jpg")
    (ex / "000000006040.txt").write_text(
        "Is there a train in this image? Please answer yes or no.\tYes\n"
        "Is there a bed in this image? Please answer yes or no.\tNo\n"
    )
    write_image(ex / "000000044279.png")
    (ex / "000000044279.txt").write_text(
        "Is there a sink in this image? Please answer yes or no.\tYes\n"
        "Is there a horse in this image? Please answer yes or no.\tNo\n"
    )
    art = root / "artwork"
    write_image(art / "images" / "10002.jpg")
    (art / "questions_answer_YES_or_NO").mkdir(parents=True)
    (art / "questions_answer_YES_or_NO" / "10002.txt").write_text(
        "Is this artwork created by Giotto? Please answer yes or no.\tYes\n"
        "Is this artwork created by Monet? Please answer yes or no.\tNo\n"
    )
    code = root / "code_reasoning"
    write_image(code / "0020.png")
    (code / "0020.txt").write_text(
        "The image shows a python code. Is the output of the code 'Hello'? Please answer yes or no.\tYes\n"
        "The image shows a python code. Is the output of the code 'World'? Please answer yes or no.\tNo\n"
    )
    (root / "eval_tool").mkdir()  # not a subtask: ignored
    return root


def write_gqa(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    write_image(root / "images" / "n161313.jpg")
    write_image(root / "images" / "n235859.jpg")
    data = {
        "20968379": {"imageId": "n161313", "question": "Is the cup to the left or right of the plate?",
                     "answer": "left", "fullAnswer": "The cup is to the left of the plate.",
                     "types": {"structural": "choose", "semantic": "rel", "detailed": "relChooser"}},
        "201640614": {"imageId": "n235859", "question": "What is the piece of furniture?",
                      "answer": "table", "types": {"structural": "query", "semantic": "cat", "detailed": "categoryThat"}},
        "20594218": {"imageId": "n161313", "question": "What is the man wearing?",
                     "answer": "t-shirt", "types": {"structural": "query", "semantic": "rel", "detailed": "relS"}},
    }
    (root / "testdev_balanced_questions.json").write_text(json.dumps(data))
    return root


def write_scienceqa(root: Path) -> Path:
    """Test problems 1 and 4 have images; 2 has none; 3 is train. The test list order is 4, 1, 2."""
    root.mkdir(parents=True, exist_ok=True)
    problems = {
        "1": {"question": "Which animal's mouth is adapted to tear through meat?",
              "choices": ["sheep", "gray wolf", "horse"], "answer": 1,
              "hint": "Gray wolves are carnivores.", "image": "image.png", "split": "test",
              "subject": "natural science", "topic": "biology", "grade": "grade4"},
        "2": {"question": "Which word is a noun?", "choices": ["run", "dog"], "answer": 1, "hint": "",
              "image": None, "split": "test", "subject": "language science"},
        "3": {"question": "Which is a state?", "choices": ["Ohio", "Paris"], "answer": 0, "hint": "",
              "image": "image.png", "split": "train", "subject": "social science"},
        "4": {"question": "Which of these states is farthest north?",
              "choices": ["Maine", "Texas"], "answer": 0, "hint": "", "image": "image.png",
              "split": "test", "subject": "social science"},
    }
    (root / "problems.json").write_text(json.dumps(problems))
    (root / "pid_splits.json").write_text(json.dumps({"train": ["3"], "val": [], "test": ["4", "1", "2"]}))
    write_image(root / "images" / "test" / "1" / "image.png")
    write_image(root / "images" / "test" / "4" / "image.png")
    write_image(root / "images" / "train" / "3" / "image.png")
    return root


MMB_HEADER = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "l2-category"]


def write_mmbench(root: Path, rows: list[list[str]] | None = None, header=MMB_HEADER,
                  name="mmbench_dev_20230712.tsv") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    img = png_b64()
    if rows is None:
        rows = [
            ["0", "What color is the square?", "nan", "red", "green", "blue", "black", "B", "attribute_recognition", img, "FP-S"],
            ["1", "Which is a fruit?", "Look at the picture.", "apple", "chair", "nan", "", "A", "image_topic", img, "CP"],
            ["2", "How many squares are there?", "", "one", "two", "three", "four", "A", "attribute_recognition", "0", "FP-S"],
        ]
    with open(root / name, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(header)
        w.writerows(rows)
    return root


def write_seed(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    write_image(root / "SEED-Bench-image" / "1454426_2591111986.jpg")
    write_image(root / "SEED-Bench-image" / "2000000_1.png")
    data = {
        "questions": [
            {"answer": "A", "choice_a": "One", "choice_b": "Two", "choice_c": "Three", "choice_d": "Four",
             "data_id": "1454426_2591111986.jpg", "data_type": "image",
             "question": "How many towels are in the image?", "question_id": "101669", "question_type_id": 5},
            {"answer": "C", "choice_a": "v1", "choice_b": "v2", "choice_c": "v3", "choice_d": "v4",
             "data_id": "v_123.mp4", "data_type": "video", "question": "What happens next?",
             "question_id": "900001", "question_type_id": 11},
            {"answer": "D", "choice_a": "A kitchen", "choice_b": "A beach", "choice_c": "A forest",
             "choice_d": "A street", "data_id": "2000000_1", "data_type": "image",
             "question": "Where is this?", "question_id": "2", "question_type_id": 1},
        ],
        "question_type": {"Scene Understanding": 1, "Instance Counting": 5, "Action Prediction": 11},
    }
    (root / "SEED-Bench.json").write_text(json.dumps(data))
    return root


# --------------------------------------------------------------------------------------------
# Answer extraction
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("Yes", "yes"), ("Yes.", "yes"), ("NO", "no"), ("no.", "no"), ("No, there is not.", "no"),
    ("There is no dog.", "no"), ("Yes, but there is no cat.", "yes"), ("yesterday", None),
    ("Not sure.", None), ("", None), (None, None),
])
def test_extract_yes_no(text, expected):
    assert extract_yes_no(text) == expected


OPTIONS = {"A": "dog", "B": "cat", "C": "a red car", "D": "bird"}


@pytest.mark.parametrize("text, expected", [
    ("B", "B"), ("b", "B"), (" B.", "B"), ("(B)", "B"), ("B)", "B"), ("b:", "B"),   # just a letter
    ("(B) cat", "B"), ("B. cat", "B"), ("B) cat", "B"), ("b. cat", "B"), ("B: cat", "B"), ("B cat", "B"),
    ("cat", "B"), ("Cat.", "B"), ("a cat", "B"),          # the option's text
    ("A red car", "C"),                                     # option text wins over the article "A"
    ("A", "A"), ("A dog", "A"),
    ("The answer is A", "A"), ("The answer is (D).", "D"), ("Answer: C", "C"), ("I pick option D", "D"),
    ("E", None), ("(E) fish", None),                        # not one of this item's letters
    ("Dog, because it barks", None), ("I don't know", None), ("", None), (None, None),
])
def test_extract_choice(text, expected):
    assert extract_choice(text, OPTIONS) == expected


def test_normalize_answer():
    assert normalize_answer("The Table.") == "table"
    assert normalize_answer("  T-shirt ") == normalize_answer("t shirt") == "t shirt"
    assert normalize_answer("Don't") == "dont"
    assert normalize_answer("an apple and a pear") == "apple and pear"


# --------------------------------------------------------------------------------------------
# POPE
# --------------------------------------------------------------------------------------------


def test_pope_load(tmp_path):
    b = load_benchmark("pope", write_pope(tmp_path / "pope"))
    assert isinstance(b, Benchmark) and b.name == "pope" and len(b.items) == 6
    assert [it.id for it in b.items] == ["random/1", "random/2", "random/3", "random/4", "adversarial/1", "adversarial/2"]
    first = b.items[0]
    assert isinstance(first, Item)
    assert first.question == f"Is there a dog in the image?\n{SHORT_ANSWER_PROMPT}"
    assert first.answer == "yes" and b.items[2].answer == "no"
    assert first.meta["subset"] == "random" and first.meta["image_id"] == COCO.format(1)
    img = first.image()
    assert img.mode == "RGB" and img.size == (4, 3)


def test_pope_score(tmp_path):
    b = load_benchmark("pope", write_pope(tmp_path / "pope"))
    preds = {
        "random/1": "Yes.",            # gold yes: TP
        "random/2": "No, I see none.",  # gold yes: FN
        "random/3": "Yes, there is.",   # gold no: FP
        "random/4": "no",               # gold no: TN
        "adversarial/1": "YES",         # gold yes: TP
        # adversarial/2 (gold no) missing: wrong, not a false positive
    }
    s = b.score(preds)
    rnd, adv, ov = s["subsets"]["random"], s["subsets"]["adversarial"], s["overall"]
    assert (rnd["tp"], rnd["fp"], rnd["tn"], rnd["fn"]) == (1, 1, 1, 1)
    assert rnd["precision"] == pytest.approx(0.5) and rnd["recall"] == pytest.approx(0.5)
    assert rnd["f1"] == pytest.approx(0.5) and rnd["accuracy"] == pytest.approx(0.5)
    assert rnd["yes_ratio"] == pytest.approx(0.5)
    assert adv["f1"] == pytest.approx(1.0) and adv["accuracy"] == pytest.approx(0.5)
    assert adv["yes_ratio"] == pytest.approx(0.5)
    # overall: TP 2, FP 1, FN 1, TN 1 of 6
    assert ov["precision"] == pytest.approx(2 / 3) and ov["recall"] == pytest.approx(2 / 3)
    assert ov["f1"] == pytest.approx(2 / 3) and ov["accuracy"] == pytest.approx(3 / 6)
    assert s["main"] == pytest.approx((0.5 + 1.0) / 2)
    assert s["main_metric"].startswith("f1") and s["n"] == 6 and s["missing"] == 1 and s["unparsed"] == 0
    json.dumps(s)


def test_pope_unparsed_counts_wrong(tmp_path):
    b = load_benchmark("pope", write_pope(tmp_path / "pope"))
    s = b.score({"random/1": "I cannot tell.", "random/3": "Maybe."})
    rnd = s["subsets"]["random"]
    assert s["unparsed"] == 2 and s["missing"] == 4
    assert rnd["fn"] == 2 and rnd["fp"] == 0 and rnd["accuracy"] == 0.0 and rnd["f1"] == 0.0


def test_pope_val2014_folder_and_limit(tmp_path):
    root = write_pope(tmp_path / "pope", image_dir="val2014")
    b = load_benchmark("pope", root, limit=5)
    assert [it.id for it in b.items][-1] == "adversarial/1" and len(b.items) == 5
    assert b.items[0].image_path.parent.name == "val2014"
    assert load_benchmark("pope", root, limit=2).score({"random/1": "yes", "random/2": "yes"})["main"] == 1.0


def test_pope_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no coco_pope_\\*.json file") as e:
        load_benchmark("pope", empty)
    assert str(empty) in str(e.value)

    root = write_pope(tmp_path / "bad_json")
    f = root / "coco_pope_random.json"
    f.write_text(f.read_text().splitlines()[0] + "\n{not json\n")
    with pytest.raises(UserError, match="line 2 is not valid JSON") as e:
        load_benchmark("pope", root)
    assert str(f) in str(e.value)

    root = write_pope(tmp_path / "no_label")
    f = root / "coco_pope_random.json"
    write_jsonl(f, [{"question_id": 1, "image": COCO.format(1), "text": "Is there a dog?"}])
    with pytest.raises(UserError, match="line 1 has no key 'label'") as e:
        load_benchmark("pope", root)
    assert str(f) in str(e.value)

    root = write_pope(tmp_path / "no_image")
    (root / "images" / COCO.format(2)).unlink()
    with pytest.raises(UserError, match=COCO.format(2)) as e:
        load_benchmark("pope", root)
    assert "coco_pope_random.json: line 3" in str(e.value)

    with pytest.raises(UserError, match="no such folder"):
        load_benchmark("pope", tmp_path / "nowhere")


# --------------------------------------------------------------------------------------------
# MME
# --------------------------------------------------------------------------------------------


def test_mme_load(tmp_path):
    b = load_benchmark("mme", write_mme(tmp_path / "MME_Benchmark_release_version"))
    ids = [it.id for it in b.items]
    assert ids == [
        "existence/000000006040/0", "existence/000000006040/1", "existence/000000044279/0",
        "existence/000000044279/1", "artwork/10002/0", "artwork/10002/1",
        "code_reasoning/0020/0", "code_reasoning/0020/1",
    ]
    it = b.items[4]
    assert it.question == f"Is this artwork created by Giotto? Please answer yes or no.\n{SHORT_ANSWER_PROMPT}"
    assert it.answer == "yes" and b.items[5].answer == "no"
    assert it.meta["category"] == "perception" and b.items[6].meta["category"] == "cognition"
    assert it.image_path.parent.name == "images"
    assert b.items[2].image().size == (4, 3)
    # a download that nests the release folder one level down is accepted too
    assert len(load_benchmark("mme", tmp_path).items) == 8


def test_mme_score(tmp_path):
    b = load_benchmark("mme", write_mme(tmp_path / "mme"))
    preds = {
        "existence/000000006040/0": "Yes", "existence/000000006040/1": "No.",   # image both right
        "existence/000000044279/0": "Yes", "existence/000000044279/1": "Yes",  # image half right
        "artwork/10002/0": "yes", "artwork/10002/1": "no",                      # both right
        "code_reasoning/0020/0": "Yes",                                         # half right (1 missing)
    }
    s = b.score(preds)
    ex = s["subtasks"]["existence"]
    assert ex["acc"] == pytest.approx(3 / 4) and ex["acc_plus"] == pytest.approx(1 / 2)
    assert ex["score"] == pytest.approx(125.0)
    assert s["subtasks"]["artwork"]["score"] == pytest.approx(200.0)
    cr = s["subtasks"]["code_reasoning"]
    assert cr["acc"] == pytest.approx(0.5) and cr["acc_plus"] == 0.0 and cr["score"] == pytest.approx(50.0)
    assert s["perception"] == pytest.approx(325.0) and s["cognition"] == pytest.approx(50.0)
    assert s["main"] == pytest.approx(375.0) and s["n"] == 8 and s["missing"] == 1
    json.dumps(s)


def test_mme_errors(tmp_path):
    root = write_mme(tmp_path / "mme")
    (root / "existence" / "000000044279.txt").write_text("Is there a sink? Yes\n")
    with pytest.raises(UserError, match="line 1 has no tab") as e:
        load_benchmark("mme", root)
    assert "000000044279.txt" in str(e.value)

    root = write_mme(tmp_path / "mme2")
    (root / "artwork" / "images" / "10002.jpg").unlink()
    with pytest.raises(UserError, match="no image named 10002") as e:
        load_benchmark("mme", root)
    assert "10002.txt" in str(e.value)

    root = write_mme(tmp_path / "mme3")
    (root / "count").mkdir()
    with pytest.raises(UserError, match="no question .txt files"):
        load_benchmark("mme", root)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no MME subtask folder"):
        load_benchmark("mme", empty)


# --------------------------------------------------------------------------------------------
# GQA
# --------------------------------------------------------------------------------------------


def test_gqa_load_and_score(tmp_path):
    b = load_benchmark("gqa", write_gqa(tmp_path / "gqa"))
    assert [it.id for it in b.items] == ["20968379", "201640614", "20594218"]
    it = b.items[0]
    assert it.question == f"Is the cup to the left or right of the plate?\n{SHORT_ANSWER_PROMPT}"
    assert it.answer == "left" and it.meta["image_id"] == "n161313" and it.meta["structural"] == "choose"
    s = b.score({"20968379": "Left.", "201640614": "The table", "20594218": "shirt"})
    assert s["main"] == pytest.approx(2 / 3) and s["main_metric"] == "accuracy" and s["n"] == 3
    assert s["by_structural_type"]["query"] == {"accuracy": 0.5, "n": 2}
    assert s["by_structural_type"]["choose"] == {"accuracy": 1.0, "n": 1}
    assert b.score({"20594218": "T-Shirt."})["main"] == pytest.approx(1 / 3)
    assert b.score({"201640614": "a wooden table"})["main"] == 0.0  # exact match, no partial credit
    assert len(load_benchmark("gqa", tmp_path / "gqa", limit=2).items) == 2


def test_gqa_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="testdev_balanced_questions.json: no such file"):
        load_benchmark("gqa", empty)

    root = write_gqa(tmp_path / "gqa")
    f = root / "testdev_balanced_questions.json"
    f.write_text('{"1": {"imageId": "n1",\n "question": }')
    with pytest.raises(UserError, match="not valid JSON at line 2") as e:
        load_benchmark("gqa", root)
    assert str(f) in str(e.value)

    f.write_text(json.dumps({"7": {"imageId": "n161313", "question": "What?"}}))
    with pytest.raises(UserError, match="question '7' has no key 'answer'"):
        load_benchmark("gqa", root)

    f.write_text(json.dumps({"7": {"imageId": "n999", "question": "What?", "answer": "x"}}))
    with pytest.raises(UserError, match="n999.jpg"):
        load_benchmark("gqa", root)


# --------------------------------------------------------------------------------------------
# ScienceQA-IMG
# --------------------------------------------------------------------------------------------


def test_scienceqa_load_and_score(tmp_path):
    b = load_benchmark("scienceqa_img", write_scienceqa(tmp_path / "sqa"))
    assert [it.id for it in b.items] == ["4", "1"]  # test split order, image problems only
    assert b.items[0].question == (
        "Which of these states is farthest north?\nA. Maine\nB. Texas\n" + LETTER_ANSWER_PROMPT
    )
    assert b.items[1].question == (
        "Context: Gray wolves are carnivores.\nWhich animal's mouth is adapted to tear through meat?\n"
        "A. sheep\nB. gray wolf\nC. horse\n" + LETTER_ANSWER_PROMPT
    )
    assert [it.answer for it in b.items] == ["A", "B"]
    assert b.items[1].meta["options"] == {"A": "sheep", "B": "gray wolf", "C": "horse"}
    s = b.score({"4": "A", "1": "C"})
    assert s["main"] == 0.5 and s["by_subject"] == {
        "social science": {"accuracy": 1.0, "n": 1}, "natural science": {"accuracy": 0.0, "n": 1}}
    assert b.score({"4": "Maine", "1": "The answer is B."})["main"] == 1.0
    assert [it.id for it in load_benchmark("scienceqa_img", tmp_path / "sqa", limit=1).items] == ["4"]


def test_scienceqa_errors(tmp_path):
    root = write_scienceqa(tmp_path / "sqa")
    problems = json.loads((root / "problems.json").read_text())
    problems["1"]["answer"] = 3
    (root / "problems.json").write_text(json.dumps(problems))
    with pytest.raises(UserError, match="problem '1': key 'answer' must be an index") as e:
        load_benchmark("scienceqa_img", root)
    assert str(root / "problems.json") in str(e.value)

    root = write_scienceqa(tmp_path / "sqa2")
    (root / "images" / "test" / "4" / "image.png").unlink()
    with pytest.raises(UserError, match="images/test/4/image.png"):
        load_benchmark("scienceqa_img", root)

    root = write_scienceqa(tmp_path / "sqa3")
    (root / "pid_splits.json").unlink()
    with pytest.raises(UserError, match="pid_splits.json: no such file"):
        load_benchmark("scienceqa_img", root)


# --------------------------------------------------------------------------------------------
# MMBench
# --------------------------------------------------------------------------------------------


def test_mmbench_load_and_score(tmp_path):
    b = load_benchmark("mmbench", write_mmbench(tmp_path / "mmb"))
    assert [it.id for it in b.items] == ["0", "1", "2"]
    assert b.items[0].question == (
        "What color is the square?\nA. red\nB. green\nC. blue\nD. black\n" + LETTER_ANSWER_PROMPT
    )
    # hint on its own line before the question; missing options ("nan", empty) left out
    assert b.items[1].question == "Look at the picture.\nWhich is a fruit?\nA. apple\nB. chair\n" + LETTER_ANSWER_PROMPT
    assert b.items[1].meta["options"] == {"A": "apple", "B": "chair"}
    assert [it.answer for it in b.items] == ["B", "A", "A"]
    img = b.items[0].image()
    assert img.mode == "RGB" and img.size == (5, 2)
    assert b.items[2].image().size == (5, 2)  # image given as a reference to row 0
    s = b.score({"0": "B", "1": "(A) apple", "2": "C. three"})
    assert s["main"] == pytest.approx(2 / 3) and s["n"] == 3
    assert s["by_category"] == {
        "attribute_recognition": {"accuracy": 0.5, "n": 2}, "image_topic": {"accuracy": 1.0, "n": 1}}
    assert b.score({"1": "C"})["unparsed"] == 1  # C is not an option of item 1
    assert len(load_benchmark("mmbench", tmp_path / "mmb", limit=1).items) == 1


def test_mmbench_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no .tsv file"):
        load_benchmark("mmbench", empty)

    two = write_mmbench(tmp_path / "two")
    write_mmbench(two, name="mmbench_test.tsv")
    with pytest.raises(UserError, match="several .tsv files"):
        load_benchmark("mmbench", two)

    header = [h for h in MMB_HEADER if h != "answer"]
    root = write_mmbench(tmp_path / "test_split", rows=[["0", "Q?", "", "a", "b", "", "", "x", "img", ""]], header=header)
    with pytest.raises(UserError, match="no 'answer' column") as e:
        load_benchmark("mmbench", root)
    assert "mmbench_dev_20230712.tsv" in str(e.value)

    root = write_mmbench(tmp_path / "bad_answer", rows=[["7", "Q?", "", "a", "b", "nan", "nan", "C", "x", png_b64(), ""]])
    with pytest.raises(UserError, match="row with index 7: 'answer' is 'C'"):
        load_benchmark("mmbench", root)

    root = write_mmbench(tmp_path / "bad_b64", rows=[["7", "Q?", "", "a", "b", "", "", "A", "x", "bm90IGFuIGltYWdl", ""]])
    item = load_benchmark("mmbench", root).items[0]
    with pytest.raises(UserError, match="not a base64-encoded image"):
        item.image()


# --------------------------------------------------------------------------------------------
# SEED-Bench-IMG
# --------------------------------------------------------------------------------------------


def test_seed_load_and_score(tmp_path):
    b = load_benchmark("seed_bench_img", write_seed(tmp_path / "seed"))
    assert [it.id for it in b.items] == ["101669", "2"]  # the video question is skipped
    assert b.items[0].question == (
        "How many towels are in the image?\nA. One\nB. Two\nC. Three\nD. Four\n" + LETTER_ANSWER_PROMPT
    )
    assert b.items[0].meta["question_type"] == "Instance Counting"
    assert b.items[1].image_path.name == "2000000_1.png"  # data_id without extension
    s = b.score({"101669": "A", "2": "A street"})
    assert s["main"] == 1.0 and s["by_question_type"]["Scene Understanding"] == {"accuracy": 1.0, "n": 1}
    s = b.score({"101669": "B. Two"})
    assert s["main"] == 0.0 and s["missing"] == 1


def test_seed_errors(tmp_path):
    root = write_seed(tmp_path / "seed")
    data = json.loads((root / "SEED-Bench.json").read_text())
    del data["questions"][0]["choice_c"]
    (root / "SEED-Bench.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match="question_id '101669' has no key 'choice_c'"):
        load_benchmark("seed_bench_img", root)

    root = write_seed(tmp_path / "seed2")
    (root / "SEED-Bench-image" / "2000000_1.png").unlink()
    with pytest.raises(UserError, match="image 2000000_1 is not in"):
        load_benchmark("seed_bench_img", root)

    root = write_seed(tmp_path / "seed3")
    (root / "SEED-Bench.json").write_text(json.dumps({"question_type": {}}))
    with pytest.raises(UserError, match="no key 'questions'"):
        load_benchmark("seed_bench_img", root)


# --------------------------------------------------------------------------------------------
# Common
# --------------------------------------------------------------------------------------------


def test_names_and_config_prefix(tmp_path):
    assert BENCHMARKS == ("pope", "mme", "gqa", "scienceqa_img", "mmbench", "seed_bench_img")
    with pytest.raises(UserError, match="unknown benchmark 'vqav2'.*pope, mme, gqa"):
        load_benchmark("vqav2", tmp_path)
    cfg = tmp_path / "model.yaml"
    with pytest.raises(UserError) as e:
        load_benchmark("gqa", tmp_path / "missing")
    assert str(e.value).startswith(f"{tmp_path / 'missing'}: no such folder")
    # quota-compile eval names the key, and the file in front of it
    with pytest.raises(UserError) as e, errors_in(cfg):
        load_benchmarks(parse_config({"version": 1, "model": {"source": "builtin:tiny-llava"},
                                      "eval": {"benchmarks": {"gqa": "missing"}}}, cfg), tmp_path)
    assert str(e.value).startswith(f"{cfg}: key 'eval.benchmarks.gqa': {tmp_path / 'missing'}: no such folder")
    with pytest.raises(UserError, match="limit must be a positive"):
        load_benchmark("gqa", write_gqa(tmp_path / "gqa"), limit=0)


def test_unreadable_image_file(tmp_path):
    root = write_gqa(tmp_path / "gqa")
    (root / "images" / "n161313.jpg").write_bytes(b"not an image")
    item = load_benchmark("gqa", root).items[0]
    with pytest.raises(UserError, match="n161313.jpg: not a readable image file"):
        item.image()


def test_scores_are_json_and_empty_predictions(tmp_path):
    writers = {"pope": write_pope, "mme": write_mme, "gqa": write_gqa, "scienceqa_img": write_scienceqa,
               "mmbench": write_mmbench, "seed_bench_img": write_seed}
    for name in BENCHMARKS:
        b = load_benchmark(name, writers[name](tmp_path / name))
        s = json.loads(json.dumps(b.score({})))
        assert s["main"] == 0.0 and isinstance(s["main"], float) and s["n"] == len(b.items) == s["missing"]
        assert isinstance(s["main_metric"], str)
