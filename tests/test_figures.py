"""quota_compile.bundle.figures: valid, deterministic PNGs; the overlay dims exactly the dropped patches."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from PIL import Image

from quota_compile.bundle.figures import (
    DIM_COLOR,
    build_overlay_figure,
    dim_unkept,
    kept_patches_overlay,
    patch_box,
    schedule_chart,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

SCHEDULE = [64, 64, 40, 40, 24, 24, 12, 12]
OTHERS = {"fastv": [64, 64] + [20] * 6, "pdrop": [64, 64, 32, 32, 16, 16, 8, 8]}


def _check_png(path, mode="RGBA"):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.mode == mode
        im.load()
        return im.size


def _noise(w, h, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), mode="RGB")


# --------------------------------------------------------------------------- schedule chart


def test_schedule_chart_writes_png(tmp_path):
    out = schedule_chart(SCHEDULE, 64, tmp_path / "sub" / "schedule.png", "tiny", keep_ratio=0.5, others=OTHERS)
    assert out == tmp_path / "sub" / "schedule.png"
    assert _check_png(out) == (600, 320)
    # minimal form: no budget line, no baselines
    assert _check_png(schedule_chart([5], 5, tmp_path / "one.png", "")) == (600, 320)


def test_schedule_chart_is_deterministic(tmp_path):
    a = schedule_chart(SCHEDULE, 64, tmp_path / "a.png", "tiny", keep_ratio=0.5, others=OTHERS)
    b = schedule_chart(SCHEDULE, 64, tmp_path / "b.png", "tiny", keep_ratio=0.5, others=OTHERS)
    assert a.read_bytes() == b.read_bytes()
    assert b"matplotlib" not in a.read_bytes().lower()  # no Software / version metadata
    c = schedule_chart(SCHEDULE, 64, tmp_path / "c.png", "tiny", keep_ratio=0.25, others=OTHERS)
    assert c.read_bytes() != a.read_bytes()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"keep": []}, "empty"),
        ({"keep": [64, 65]}, "layer 1 keeps 65"),
        ({"keep": [64, -1]}, "layer 1 keeps -1"),
        ({"keep": [64, 1.5]}, "integer"),
        ({"num_visual": 0}, "num_visual must be positive"),
        ({"keep_ratio": 1.5}, "keep_ratio"),
        ({"others": {"fastv": [64, 64]}}, "has 2 layers but keep has 8"),
        ({"others": {"pdrop": [64] * 7 + [99]}}, "others['pdrop']: layer 7 keeps 99"),
    ],
)
def test_schedule_chart_rejects_bad_input(tmp_path, kwargs, message):
    args = {"keep": SCHEDULE, "num_visual": 64, "path": tmp_path / "x.png", "title": "t"} | kwargs
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        schedule_chart(**args)
    assert not (tmp_path / "x.png").exists()


# --------------------------------------------------------------------------- geometry and dim_unkept


def test_patch_box_covers_every_pixel_once():
    w, h, rows, cols = 70, 50, 6, 8  # neither side a multiple of the grid
    cover = np.zeros((h, w), dtype=int)
    for i in range(rows * cols):
        left, top, right, bottom = patch_box(i, (w, h), (rows, cols))
        assert right > left and bottom > top
        cover[top:bottom, left:right] += 1
    assert (cover == 1).all()
    assert patch_box(rows * cols - 1, (w, h), (rows, cols))[2:] == (w, h)
    assert patch_box(0, (64, 64), (8, 8)) == (0, 0, 8, 8)
    assert patch_box(9, (64, 64), (8, 8)) == (8, 8, 16, 16)


@pytest.mark.parametrize(("size", "grid"), [((64, 64), (8, 8)), ((70, 50), (6, 8)), ((37, 29), (4, 5)), ((48, 48), (24, 24))])
def test_dim_unkept_classifies_every_patch(size, grid):
    rows, cols = grid
    image = _noise(*size, seed=1)
    src = np.asarray(image).astype(np.float64)
    kept = [i for i in range(rows * cols) if (i * 7) % 3 == 0] + [rows * cols - 1]  # includes the last row/column
    kept = sorted(set(kept))
    out = np.asarray(dim_unkept(image, grid, kept))
    assert out.shape == src.shape and out.dtype == np.uint8
    expected_dim = np.rint(src * 0.25 + np.array(DIM_COLOR) * 0.75).astype(np.uint8)
    for i in range(rows * cols):
        left, top, right, bottom = patch_box(i, size, grid)
        got = out[top:bottom, left:right]
        if i in kept:
            np.testing.assert_array_equal(got, np.asarray(image)[top:bottom, left:right], err_msg=f"kept patch {i} changed")
        else:
            np.testing.assert_array_equal(got, expected_dim[top:bottom, left:right], err_msg=f"dropped patch {i} not dimmed")


def test_dim_unkept_on_white_image():
    white = Image.new("RGB", (64, 64), "white")
    out = np.asarray(dim_unkept(white, (8, 8), [0, 63]))
    assert (out[0:8, 0:8] == 255).all() and (out[56:64, 56:64] == 255).all()
    dimmed = round(255 * 0.25 + DIM_COLOR[0] * 0.75)
    assert (out[8:16, 0:8] == dimmed).all()
    assert (np.asarray(dim_unkept(white, (8, 8), [], strength=0.0)) == 255).all()
    # non-RGB inputs are converted, the input is not modified
    grey = Image.new("L", (16, 16), 200)
    assert dim_unkept(grey, (2, 2), [0]).mode == "RGB"
    assert grey.getpixel((15, 15)) == 200


@pytest.mark.parametrize(
    ("grid", "kept", "message"),
    [
        ((8, 8), [64], "kept index 64 is out of range.*0..63"),
        ((8, 8), [-1], "kept index -1 is out of range"),
        ((8, 8), [3, 3], "listed more than once"),
        ((8, 8), [1.0], "integer"),
        ((0, 8), [], "at least one row and one column"),
        ((8, 0), [], "at least one row and one column"),
        ((), [], r"\(rows, cols\) pair"),
        ((8,), [], r"\(rows, cols\) pair"),
    ],
)
def test_dim_unkept_rejects_bad_input(grid, kept, message):
    with pytest.raises(ValueError, match=message):
        dim_unkept(Image.new("RGB", (64, 64)), grid, kept)


def test_dim_unkept_rejects_bad_strength():
    with pytest.raises(ValueError, match="strength"):
        dim_unkept(Image.new("RGB", (8, 8)), (2, 2), [0], strength=1.5)


# --------------------------------------------------------------------------- overlay


def test_overlay_writes_png_for_various_grids(tmp_path):
    cases = [
        (_noise(336, 336), (24, 24), {2: list(range(0, 576, 3)), 5: list(range(0, 576, 7)), 7: [0, 575]}),
        (_noise(32, 32), (8, 8), {1: [0, 9, 63]}),
        (_noise(40, 30), (24, 24), {0: list(range(10))}),  # image smaller than the grid is upscaled
        (_noise(64, 64), (8, 8), {9: [], 3: list(range(64))}),  # all dropped / all kept
    ]
    for j, (image, grid, kept) in enumerate(cases):
        out = kept_patches_overlay(image, grid, kept, tmp_path / f"o{j}.png", title=f"case {j}")
        w, h = _check_png(out)
        assert 200 < w < 2000 and 200 < h < 2000


def test_overlay_panels_in_layer_order():
    _, axes = build_overlay_figure(_noise(32, 32), (8, 8), {9: [1, 2], 3: list(range(64)), 5: []})
    assert [ax.get_title() for ax in axes] == ["input", "layer 3: 64/64 kept", "layer 5: 0/64 kept", "layer 9: 2/64 kept"]


def test_overlay_empty_kept_shows_no_pruning(tmp_path):
    fig, axes = build_overlay_figure(_noise(32, 32), (8, 8), {})
    assert len(axes) == 1
    assert "no pruning" in axes[0].get_title()
    assert any(t.get_text() == "no pruning" for t in axes[0].texts)
    assert _check_png(kept_patches_overlay(_noise(32, 32), (8, 8), {}, tmp_path / "e.png"))


def test_overlay_is_deterministic(tmp_path):
    args = (_noise(48, 48), (8, 8), {4: [0, 1, 2, 10, 63], 2: list(range(0, 64, 2))})
    a = kept_patches_overlay(*args, tmp_path / "a.png", title="t")
    b = kept_patches_overlay(*args, tmp_path / "b.png", title="t")
    assert a.read_bytes() == b.read_bytes()
    # and from another thread (no pyplot / global figure state involved)
    done = []
    worker = threading.Thread(target=lambda: done.append(kept_patches_overlay(*args, tmp_path / "c.png", title="t")))
    worker.start()
    worker.join(timeout=30)
    assert done and done[0].read_bytes() == a.read_bytes()


def test_overlay_png_dims_exactly_the_dropped_patches(tmp_path):
    """Locate the layer panel in the written PNG from the figure layout and compare the
    brightness in the middle of every patch."""
    white = Image.new("RGB", (64, 64), "white")
    kept = [0, 9, 18, 27, 7, 63, 56, 35]
    path = kept_patches_overlay(white, (8, 8), {4: kept}, tmp_path / "w.png")
    fig, axes = build_overlay_figure(white, (8, 8), {4: kept})
    fig.canvas.draw()  # same inputs, same layout as the saved file
    png = np.asarray(Image.open(path).convert("L")).astype(float)
    assert png.shape == (int(fig.bbox.height), int(fig.bbox.width))
    panel = axes[1]
    # data units: the display image spans x in (0, W), y in (0, H) with y pointing down
    assert panel.get_xlim()[0] == 0 and panel.get_ylim()[1] == 0
    width, height = panel.get_xlim()[1], panel.get_ylim()[0]
    means = {}
    for i in range(64):
        r, c = divmod(i, 8)
        cx, cy = (c + 0.5) * width / 8, (r + 0.5) * height / 8
        (px0, py0), (px1, py1) = panel.transData.transform([(cx - width / 40, cy - height / 40), (cx + width / 40, cy + height / 40)])
        rows_ = sorted(int(png.shape[0] - v) for v in (py0, py1))
        cols_ = sorted(int(v) for v in (px0, px1))
        block = png[rows_[0] : rows_[1] + 1, cols_[0] : cols_[1] + 1]
        assert block.size > 0
        means[i] = block.mean()
    kept_means = [means[i] for i in kept]
    dropped_means = [m for i, m in means.items() if i not in kept]
    assert min(kept_means) > 250
    assert max(dropped_means) < 100
    # the input panel is untouched white in the same places
    inp = axes[0]
    (px, py) = inp.transData.transform((width / 16 * 3, height / 16 * 3))
    assert png[int(png.shape[0] - py), int(px)] > 250


@pytest.mark.parametrize(
    ("grid", "kept", "message"),
    [
        ((8, 8), {2: [64]}, "layer 2: kept index 64 is out of range"),
        ((8, 8), {2: [1, 1]}, "layer 2: kept index 1 is listed more than once"),
        ((8, 8), {-1: [1]}, "non-negative"),
        ((8, 8), {"a": [1]}, "layer key must be an integer"),
        ((8, 8), [1, 2], "kept must map"),
        ((0, 0), {}, "at least one row and one column"),
    ],
)
def test_overlay_rejects_bad_input(tmp_path, grid, kept, message):
    with pytest.raises(ValueError, match=message):
        kept_patches_overlay(Image.new("RGB", (32, 32)), grid, kept, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_overlay_rejects_non_image(tmp_path):
    with pytest.raises(ValueError, match="PIL.Image"):
        kept_patches_overlay("not an image", (8, 8), {}, tmp_path / "x.png")
