"""scripts/train_shapes_llava.py: the tiny config trains, resumes exactly, exports a folder that
loads offline, and its inputs, loss mask and forward match what transformers' Llava does."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from quota_compile.data.shapes import make_sample, question_families, to_chat

ROOT = Path(__file__).resolve().parent.parent


def _load_script():
    spec = importlib.util.spec_from_file_location("train_shapes_llava", ROOT / "scripts" / "train_shapes_llava.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


T = _load_script()
TINY = ["--tiny", "--batch", "4", "--eval-samples", "0", "--log-every", "1", "--threads", "1",
        "--vision-steps", "2", "--curriculum-steps", "4", "--warmup", "2", "--lr", "3e-3", "--parse-weight", "1.0", "--letter-weight", "1.0"]


def _run(out: Path, *extra: str) -> list[dict]:
    assert T.main(["--out", str(out), *TINY, *extra]) == 0
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tok():
    return T.build_tokenizer()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An uninterrupted tiny run of 8 steps (checkpoint and evaluation every 4)."""
    out = tmp_path_factory.mktemp("run") / "full"
    records = _run(out, "--steps", "8", "--eval-every", "4")
    return out, records


def _samples(split: str, n: int, **kw):
    return [make_sample(split, 0, i, **kw) for i in range(n)]


def test_tiny_trains_with_finite_decreasing_loss(tmp_path):
    out = tmp_path / "run"
    records = _run(out, "--steps", "14", "--eval-every", "100", "--vision-steps", "0", "--curriculum-steps", "0")
    rows = [r for r in records if "loss" in r]
    assert len(rows) == 14
    for key in ("loss", "vqa_loss", "aux_loss", "attn_loss"):
        assert all(np.isfinite([r[key] for r in rows])), key
    # The total also holds the attention terms, which jump with the batch's question mix.
    for key in ("vqa_loss", "aux_loss"):
        losses = [r[key] for r in rows]
        assert np.mean(losses[-4:]) < np.mean(losses[:4]), key
    stop = records[-1]
    assert stop["event"] == "stop" and stop["reason"] == "done" and stop["step"] == 14
    assert (out / "checkpoint.pt").is_file() and (out / "hf" / "model.safetensors").is_file()


@pytest.mark.parametrize("stop", [["--stop-after", "4"], ["--minutes", "0"]], ids=["after-4-of-8", "minutes-after-1"])
def test_resume_equals_uninterrupted(tmp_path, trained, stop):
    full_dir, _ = trained
    out = tmp_path / "resumed"
    records = _run(out, "--steps", "8", "--eval-every", "4", *stop)
    first = torch.load(out / "checkpoint.pt", weights_only=False)
    assert first["step"] == records[-1]["step"] == (4 if stop[0] == "--stop-after" else 1)
    _run(out, "--steps", "8", "--eval-every", "4", "--resume")
    a = torch.load(full_dir / "checkpoint.pt", weights_only=False)
    b = torch.load(out / "checkpoint.pt", weights_only=False)
    assert a["step"] == b["step"] == 8
    for key in ("model", "aux_heads"):
        for name, t in a[key].items():
            torch.testing.assert_close(b[key][name], t, rtol=1e-5, atol=1e-6, msg=name)
    for group_a, group_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        torch.testing.assert_close(group_b["exp_avg"], group_a["exp_avg"], rtol=1e-5, atol=1e-7)
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"]


def test_checkpoint_is_atomic_and_complete(trained):
    out, _ = trained
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert {"model", "aux_heads", "optimizer", "scheduler", "step", "rng", "run"} <= set(state)
    assert not list(out.glob("*.tmp"))


def test_export_loads_offline_with_64_visual_tokens(trained, tok):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    out, records = trained
    folder = out / "hf"
    model = LlavaForConditionalGeneration.from_pretrained(folder, local_files_only=True)
    processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    assert model.config.vision_feature_select_strategy == "default"
    assert model.config.vision_config.image_size == 64 and model.config.vision_config.patch_size == 8
    image_id = model.config.image_token_index
    # The exported weights are the trained ones.
    state = torch.load(out / "checkpoint.pt", weights_only=False)["model"]
    for name, t in model.state_dict().items():
        torch.testing.assert_close(t, state[name], msg=name)
    shares = []
    for family in question_families():
        for s in _samples("test", 20, families=[family]):
            prompt = T.PROMPT_TEMPLATE.replace("{question}", to_chat(s.question))
            enc = processor(images=[s.image], text=[prompt], return_tensors="pt")
            ids = enc["input_ids"][0]
            n_img = int((ids == image_id).sum())
            assert n_img == 64
            assert int((ids == tok.unk_token_id).sum()) == 0
            shares.append(n_img / len(ids))
    assert min(shares) >= 0.70, min(shares)
    # Greedy generation runs end to end through transformers.
    s = make_sample("test", 0, 0)
    enc = processor(images=[s.image], text=[T.PROMPT_TEMPLATE.replace("{question}", to_chat(s.question))], return_tensors="pt")
    gen = model.generate(**enc, max_new_tokens=3, do_sample=False)
    assert gen.shape[1] > enc["input_ids"].shape[1]
    assert records[-1]["export_bytes"] < 20 * 2**20


def test_encoder_matches_processor_and_hf_forward(tok):
    cfg = T.ModelConfig.tiny()
    processor = T.build_processor(cfg, tok)
    model = T.build_model(cfg, tok).eval()
    enc = T.Encoder(tok, cfg)
    samples = [make_sample("calibration", 0, i, families=[f]) for i, f in enumerate(question_families())]
    batch = enc.batch(samples)
    prompts = [T.PROMPT_TEMPLATE.replace("{question}", to_chat(s.question)) for s in samples]
    ref = processor(images=[s.image for s in samples], text=prompts, return_tensors="pt", padding=True)
    for i, length in enumerate(batch.prompt_lengths):
        assert ref["input_ids"][i][ref["attention_mask"][i].bool()].tolist() == batch.input_ids[i, :length].tolist()
    torch.testing.assert_close(batch.pixel_values, ref["pixel_values"], rtol=0, atol=1e-5)
    with torch.no_grad():
        hf = model(input_ids=batch.input_ids, pixel_values=batch.pixel_values, attention_mask=batch.attention_mask).logits
        feats = T.vision_features(model, batch.pixel_values)
        ours = T.decoder_logits(model, feats, batch.input_ids, batch.attention_mask)
    torch.testing.assert_close(ours, hf, rtol=1e-5, atol=1e-5)


def test_loss_mask_covers_exactly_answer_and_eos(tok):
    enc = T.Encoder(tok, T.ModelConfig.tiny())
    samples = [make_sample("train", 0, i, families=[f]) for i, f in enumerate(question_families() * 2)]
    batch = enc.batch(samples)
    for i, s in enumerate(samples):
        rows = (batch.targets[i] != -100).nonzero().flatten().tolist()
        answer = tok(" " + s.question.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        length = batch.prompt_lengths[i]
        # Positions t predict token t + 1: exactly the answer tokens and EOS, right after the prompt.
        assert [r + 1 for r in rows] == list(range(length, length + len(answer)))
        assert batch.targets[i, rows].tolist() == answer == batch.input_ids[i, length : length + len(answer)].tolist()
        assert tok.decode(answer, skip_special_tokens=True).strip() == s.question.answer
        assert batch.attention_mask[i].sum() == length + len(answer)


def test_vocabulary_covers_every_split(tok):
    unk = tok.unk_token_id
    for split in ("train", "calibration", "test"):
        for s in _samples(split, 300):
            ids = tok(to_chat(s.question) + " " + s.question.answer)["input_ids"]
            assert unk not in ids, to_chat(s.question)


def test_aux_targets_shapes_and_centres(tok):
    cfg = T.ModelConfig.tiny()
    enc = T.Encoder(tok, cfg)
    s = make_sample("train", 0, 3)
    t = enc.aux_targets(s.scene)
    assert all(v.shape == (cfg.num_visual_tokens,) for v in t.values())
    assert t["centre"].sum() == len({(int(x.centre[0] // 8), int(x.centre[1] // 8)) for x in s.scene.shapes})


def test_where_targets_are_the_named_objects_centre_cells(tok):
    """The where heads' targets: grid (col, row) of the named object's centre (a relation's
    second object in slots 2-3), -100 where no single present object is named."""
    enc = T.Encoder(tok, T.ModelConfig.full())
    seen = set()
    for i in range(200):
        s = make_sample("train", 0, i)
        t = enc.where_targets(s)
        mode, first, second = T.referred_objects(s)
        if mode in ("count", "none") or len(first) != 1:
            assert (t[:2] == -100).all()
            continue
        seen.add(s.question.family)
        cell = lambda o: [int(o.centre[0] // 8), int(o.centre[1] // 8)]  # noqa: E731
        assert t[:2].tolist() == cell(first[0])
        assert t[2:].tolist() == cell(second[0])
        if s.question.family == "position" and s.question.subtype == "side":
            word = s.question.answer
            col, row = t[:2]
            assert {"left": col < 4, "right": col >= 4, "top": row < 4, "bottom": row >= 4}[word]
    assert {"colour", "shape", "position"} <= seen


def test_position_heads_leave_a_checkpoint_without_them_resumable(tmp_path):
    """A run with the position heads resumes a checkpoint written without them (fresh heads)."""
    out = tmp_path / "run"
    _run(out, "--steps", "4", "--eval-every", "100", "--proj-pos-weight", "0", "--where-weight", "0")
    assert "pos_heads" not in torch.load(out / "checkpoint.pt", weights_only=False)
    records = _run(out, "--steps", "8", "--eval-every", "100", "--resume")
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["step"] == 8 and {"pos_heads", "pos_optimizer"} <= set(state)
    rows = [r for r in records if "aux_parts" in r and r["step"] > 4]
    assert rows and all(np.isfinite(r["aux_parts"]["where"]) and np.isfinite(r["aux_parts"]["proj_pos"]) for r in rows)


def test_attention_probe_matches_eager_attention(tok):
    cfg = T.ModelConfig.tiny()
    model = T.build_model(cfg, tok).eval()
    model.set_attn_implementation("eager")
    enc = T.Encoder(tok, cfg)
    batch = enc.batch([make_sample("train", 0, i, families=[f]) for i, f in enumerate(question_families())])
    probe = T.AttentionProbe(model, 1)
    with torch.no_grad():
        out = model(input_ids=batch.input_ids, pixel_values=batch.pixel_values, attention_mask=batch.attention_mask,
                    output_attentions=True)
        query = torch.tensor([n - 1 for n in batch.prompt_lengths])
        probs = probe.probs(query, batch.attention_mask)
    probe.remove()
    ref = out.attentions[1][torch.arange(len(query)), :, query]
    torch.testing.assert_close(probs, ref, rtol=1e-4, atol=1e-6)


def test_attention_targets(tok):
    cfg = T.ModelConfig.full()
    enc = T.Encoder(tok, cfg)
    seen = set()
    for i in range(300):
        s = make_sample("train", 0, i)
        q = s.question
        prompt = enc.prompt_ids(to_chat(q))
        target = enc.attention_targets(s)
        mode, first, second = T.referred_objects(s)
        if mode == "none":
            assert target.sum() == 0
        else:
            np.testing.assert_allclose(target.sum(-1), 1.0, rtol=1e-5)
        if mode == "count":
            # <s> holds 1 / (n + 1), each counted object's centre patch as much again.
            assert target[0, 0] == pytest.approx(1 / (len(first) + 1))
            assert (target[0, 1:] > 0).sum() == len(first)
            if q.family == "count":
                assert len(first) == T.NUMBERS.index(q.answer)
        elif mode == "exists":
            assert (target[0, 0] == 1.0) == (q.answer == "no")
        elif mode in ("find", "relation"):
            assert len(first) == 1 and target[0, 0] == 0
            assert target[0, 1 + enc.centre_patch(first[0])] > 0 or first[0].small
        if mode == "relation":
            assert len(second) == 1 and not np.array_equal(target[0], target[1])
        pos = enc.option_target(s, prompt)
        if q.family == "choice":
            option = q.options[T.LETTERS.index(q.answer)]
            assert tok.convert_ids_to_tokens(prompt[pos]) == option.split()[-1]
            letter_pos = pos - len(option.split())
            assert tok.convert_ids_to_tokens(prompt[letter_pos]) == f"{q.answer}."
        else:
            assert pos == -1
        assert np.isfinite(target).all()
        seen.add(mode)
    assert seen == {"find", "exists", "count", "relation", "none"}


# Only a hang reaches these: the test waits for the script's own output, not for a time.
HANG_S = 600


def test_sigterm_checkpoints_and_exports(tmp_path):
    """SIGTERM during training: the script finishes its step, checkpoints, exports and exits 0.
    The signal is sent once the script has printed its first loss record: it prints (and
    flushes) each log record as it writes it, and writes them inside the block where its
    SIGINT/SIGTERM handler is installed, so that line says the handler is in place and a step
    is done. The waits time out only on a hang."""
    import signal
    import subprocess
    import threading

    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "scripts" / "train_shapes_llava.py"), "--out", str(out), *TINY,
           "--steps", "100000", "--eval-every", "100000"]
    printed: list[dict] = []
    stepped, answered = threading.Event(), threading.Event()  # a loss record; that or the end of the output

    def read(stream) -> None:
        try:
            for line in stream:
                try:
                    record = json.loads(line)
                except ValueError:  # not a log record
                    continue
                printed.append(record)
                if "loss" in record:
                    stepped.set()
                    answered.set()
        finally:
            answered.set()

    with open(tmp_path / "stderr.txt", "w") as err, \
            subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True) as proc:
        reader = threading.Thread(target=read, args=(proc.stdout,), daemon=True)
        reader.start()
        try:
            answered.wait(HANG_S)
            assert stepped.is_set(), f"no loss record; exit code {proc.poll()}: {(tmp_path / 'stderr.txt').read_text()[-2000:]}"
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=HANG_S) == 0, (tmp_path / "stderr.txt").read_text()[-2000:]
        finally:
            if proc.poll() is None:
                proc.kill()
        reader.join(HANG_S)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert records == printed  # what it printed is what it logged
    stop = records[-1]
    assert stop["event"] == "stop" and stop["reason"] == "SIGTERM"
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == stop["step"] > 0
    assert (out / "hf" / "model.safetensors").is_file()


def test_parse_targets_point_at_the_stem_colour_and_kind_words(tok):
    cfg = T.ModelConfig.full()
    enc = T.Encoder(tok, cfg)
    colours, kinds = set(T.COLOUR_NAMES), set(T.KINDS) | set(T.PLURALS.values())
    for i in range(200):
        s = make_sample("train", 0, i)
        q = s.question
        prompt = enc.prompt_ids(to_chat(q))
        target = enc.parse_targets(s, prompt, len(prompt) + 3)
        words = [tok.convert_ids_to_tokens(t).rstrip("?.,") for t in prompt]
        stem = [w.rstrip("?.,") for w in q.text.split()]
        for row, vocab in enumerate((colours, kinds)):
            named = [w for w in stem if w in vocab]
            hit = np.flatnonzero(target[row])
            assert [words[j] for j in hit] == named  # exactly the stem's words, in order
            if named:
                np.testing.assert_allclose(target[row, hit], 1 / len(named), rtol=1e-6)
                # never an option or the instruction: every hit lies inside the stem's span
                assert hit.max() < len(prompt) - 1 - (len(to_chat(q).split()) - len(stem))
            else:
                assert target[row].sum() == 0


def test_letter_targets_pair_each_option_with_its_letter(tok):
    enc = T.Encoder(tok, T.ModelConfig.full())
    seen = 0
    for i in range(200):
        s = make_sample("train", 0, i)
        prompt = enc.prompt_ids(to_chat(s.question))
        pairs = enc.letter_targets(s, prompt)
        if s.question.family != "choice":
            assert (pairs == -1).all()
            continue
        seen += 1
        for k, (last, mark) in enumerate(pairs):
            option = s.question.options[k]
            assert tok.convert_ids_to_tokens(prompt[mark]) == f"{T.LETTERS[k]}."
            assert tok.convert_ids_to_tokens(prompt[last]) == option.split()[-1]
            assert last - mark == len(option.split())
    assert seen > 10
