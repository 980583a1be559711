"""Figures for the bundle report: the per-layer visual-token schedule and the
patches each pruning layer keeps, drawn over the image the vision tower saw.

Everything here uses matplotlib's object API with the Agg canvas (``Figure`` +
``FigureCanvasAgg``), never pyplot, so no global figure state is touched: the functions are safe
in tests, in worker threads and on machines without a display. PNGs are written without the
``Software`` metadata entry and without dates, so the same inputs give byte-identical files.

Patch geometry (shared by :func:`patch_box`, :func:`dim_unkept` and the overlay): an image of
width W and height H split into a ``(rows, cols)`` grid puts pixel column ``x`` in patch column
``x * cols // W`` and pixel row ``y`` in patch row ``y * rows // H``; visual token ``i`` is the
patch at row ``i // cols``, column ``i % cols`` (row-major). Every pixel belongs to exactly one
patch, including the last row and column when W or H is not a multiple of the grid.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image

__all__ = [
    "DIM_COLOR",
    "build_overlay_figure",
    "dim_unkept",
    "kept_patches_overlay",
    "patch_box",
    "retention_chart",
    "schedule_chart",
]

#: The colour dropped patches are blended toward (dark grey).
DIM_COLOR: tuple[int, int, int] = (32, 32, 32)

_DPI = 100
_SCHEDULE_SIZE_IN = (6.0, 3.2)
_PANEL_IN = 2.6  # one overlay panel is about 2.6 x 2.6 inches
_PANELS_PER_ROW = 4
_MIN_DISPLAY_PX = 256  # small images are upscaled (nearest neighbour) to at least this side
_MIN_PATCH_PX = 4  # ... and so that every patch covers at least this many pixels a side
_MAX_UPSCALE = 64
# Fixed PNG metadata: no "Software" (matplotlib version) entry, nothing time-dependent.
_PNG_METADATA: dict[str, Any] = {"Software": None}


# --------------------------------------------------------------------------- validation


def _as_int(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{what} must be an integer, got the boolean {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{what} must be an integer, got {value!r} ({type(value).__name__})") from None


def _check_grid(grid: Any) -> tuple[int, int]:
    try:
        items = tuple(grid)
    except TypeError:
        raise ValueError(f"grid must be a (rows, cols) pair of positive integers, got {grid!r}") from None
    if len(items) != 2:
        raise ValueError(f"grid must be a (rows, cols) pair of positive integers, got {grid!r}")
    rows, cols = (_as_int(v, "grid entry") for v in items)
    if rows <= 0 or cols <= 0:
        raise ValueError(f"grid must have at least one row and one column, got (rows, cols) = ({rows}, {cols})")
    return rows, cols


def _check_indices(indices: Iterable[Any], num_patches: int, where: str) -> list[int]:
    if isinstance(indices, (str, bytes)) or not isinstance(indices, Iterable):
        raise ValueError(f"{where}: kept indices must be a list of integers, got {indices!r}")
    out = [_as_int(i, f"{where}: kept index") for i in indices]
    bad = [i for i in out if not 0 <= i < num_patches]
    if bad:
        raise ValueError(
            f"{where}: kept index {bad[0]} is out of range: the grid has {num_patches} patches, so indices must be in 0..{num_patches - 1}"
        )
    if len(set(out)) != len(out):
        dup = next(i for i in out if out.count(i) > 1)
        raise ValueError(f"{where}: kept index {dup} is listed more than once")
    return out


def _as_rgb(image: Any) -> Image.Image:
    if isinstance(image, np.ndarray):
        arr = image
        if arr.dtype != np.uint8:
            raise ValueError(f"image array must be uint8, got {arr.dtype}")
        if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
            raise ValueError(f"image array must be HxW, HxWx3 or HxWx4, got shape {arr.shape}")
        image = Image.fromarray(arr)
    if not isinstance(image, Image.Image):
        raise ValueError(f"image must be a PIL.Image (or a uint8 numpy array), got {type(image).__name__}")
    if image.width <= 0 or image.height <= 0:
        raise ValueError(f"image is empty ({image.width}x{image.height})")
    return image if image.mode == "RGB" else image.convert("RGB")


# --------------------------------------------------------------------------- geometry


def _edges(size: int, n: int) -> list[int]:
    """Pixel edges of ``n`` patches over ``size`` pixels: patch j covers [e[j], e[j+1])."""
    return [-(-j * size // n) for j in range(n + 1)]  # ceil(j * size / n)


def patch_box(index: int, image_size: tuple[int, int], grid: tuple[int, int]) -> tuple[int, int, int, int]:
    """The pixel box ``(left, top, right, bottom)`` (right/bottom exclusive, PIL convention) of
    visual token ``index`` in an image of ``image_size = (width, height)`` split into ``grid =
    (rows, cols)``. The box is empty when the image has fewer pixels than the grid has patches
    along that axis."""
    rows, cols = _check_grid(grid)
    width, height = (_as_int(v, "image size") for v in image_size)
    index = _as_int(index, "patch index")
    if not 0 <= index < rows * cols:
        raise ValueError(f"patch index {index} is out of range: the grid has {rows * cols} patches (0..{rows * cols - 1})")
    r, c = divmod(index, cols)
    xs, ys = _edges(width, cols), _edges(height, rows)
    return xs[c], ys[r], xs[c + 1], ys[r + 1]


def _patch_index_map(width: int, height: int, rows: int, cols: int) -> np.ndarray:
    """(H, W) array: the visual-token index each pixel belongs to."""
    col = (np.arange(width, dtype=np.int64) * cols) // width
    row = (np.arange(height, dtype=np.int64) * rows) // height
    return row[:, None] * cols + col[None, :]


def dim_unkept(
    image: Image.Image,
    grid: tuple[int, int],
    kept_indices: Iterable[int],
    strength: float = 0.75,
) -> Image.Image:
    """A copy of ``image`` (as RGB) in which every patch NOT in ``kept_indices`` is blended toward
    :data:`DIM_COLOR`: ``out = (1 - strength) * pixel + strength * DIM_COLOR`` (rounded to
    nearest). Pixels of kept patches are returned unchanged, bit for bit.

    Raises ValueError for an empty or malformed grid, an index outside ``0..rows*cols-1``, a
    repeated index, or a strength outside [0, 1].
    """
    rows, cols = _check_grid(grid)
    kept = _check_indices(kept_indices, rows * cols, "dim_unkept")
    strength = float(strength)
    if not 0.0 <= strength <= 1.0 or math.isnan(strength):
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    rgb = _as_rgb(image)
    arr = np.asarray(rgb, dtype=np.uint8)
    keep_patch = np.zeros(rows * cols, dtype=bool)
    keep_patch[kept] = True
    keep_px = keep_patch[_patch_index_map(rgb.width, rgb.height, rows, cols)]
    dimmed = np.rint(arr.astype(np.float64) * (1.0 - strength) + np.asarray(DIM_COLOR, dtype=np.float64) * strength)
    out = np.where(keep_px[:, :, None], arr, np.clip(dimmed, 0, 255).astype(np.uint8))
    return Image.fromarray(np.ascontiguousarray(out, dtype=np.uint8), mode="RGB")


# --------------------------------------------------------------------------- output


def _new_figure(figsize: tuple[float, float]) -> Figure:
    fig = Figure(figsize=figsize, dpi=_DPI)
    FigureCanvasAgg(fig)  # attaches itself as fig.canvas: Agg, whatever the global backend is
    return fig


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=_DPI, metadata=_PNG_METADATA)
    return path


# --------------------------------------------------------------------------- schedule chart


def _check_schedule(keep: Any, num_visual: int, what: str) -> list[int]:
    if isinstance(keep, (str, bytes)) or not isinstance(keep, Iterable):
        raise ValueError(f"{what} must be a list of per-layer token counts, got {keep!r}")
    counts = [_as_int(k, f"{what} entry") for k in keep]
    if not counts:
        raise ValueError(f"{what} is empty: it needs one token count per decoder layer")
    for layer, k in enumerate(counts):
        if not 0 <= k <= num_visual:
            raise ValueError(f"{what}: layer {layer} keeps {k} tokens, outside 0..{num_visual} (num_visual)")
    return counts


def schedule_chart(
    keep: list[int],
    num_visual: int,
    path: Path,
    title: str,
    keep_ratio: float | None = None,
    others: dict[str, list[int]] | None = None,
) -> Path:
    """Bar chart of the visual tokens each decoder layer processes (x: layer index, y: tokens,
    from 0 to ``num_visual``), with a dashed "budget (average)" line at ``keep_ratio *
    num_visual`` when given and the ``others`` schedules (e.g. the fastv / pdrop baselines) drawn
    as step lines for comparison. Written as a 600x320 PNG at ``path``; returns ``path``."""
    num_visual = _as_int(num_visual, "num_visual")
    if num_visual <= 0:
        raise ValueError(f"num_visual must be positive, got {num_visual}")
    counts = _check_schedule(keep, num_visual, "keep")
    if keep_ratio is not None:
        keep_ratio = float(keep_ratio)
        if math.isnan(keep_ratio) or not 0.0 <= keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio must be in [0, 1], got {keep_ratio}")
    baselines: list[tuple[str, list[int]]] = []
    for name, sched in (others or {}).items():
        other = _check_schedule(sched, num_visual, f"others[{name!r}]")
        if len(other) != len(counts):
            raise ValueError(f"others[{name!r}] has {len(other)} layers but keep has {len(counts)}; schedules must cover the same decoder layers")
        baselines.append((str(name), other))

    fig = _new_figure(_SCHEDULE_SIZE_IN)
    ax = fig.add_subplot(1, 1, 1)
    layers = np.arange(len(counts))
    mean = float(np.mean(counts))
    ax.bar(layers, counts, width=0.85, color="#4C72B0", alpha=0.85, label=f"schedule (mean {mean:.1f})", zorder=2)
    if keep_ratio is not None:
        ax.axhline(keep_ratio * num_visual, color="#C44E52", linestyle="--", linewidth=1.2, label="budget (average)", zorder=3)
    palette = ["#DD8452", "#55A868", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C", "#CCB974", "#64B5CD"]
    for j, (name, other) in enumerate(baselines):
        ax.step(layers, other, where="mid", color=palette[j % len(palette)], linewidth=1.4, label=name, zorder=4)
    ax.set_xlim(-0.6, len(counts) - 0.4)
    ax.set_ylim(0, num_visual)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("visual tokens processed")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", linewidth=0.4, alpha=0.5, zorder=0)
    ax.legend(loc="upper right", fontsize=7, framealpha=0.85)
    fig.tight_layout()
    return _save(fig, path)


# --------------------------------------------------------------------------- kept-patch overlay


def _display_scale(width: int, height: int, rows: int, cols: int) -> int:
    """Integer nearest-neighbour upscale factor so small images show visible patches."""
    need = max(
        math.ceil(_MIN_DISPLAY_PX / min(width, height)),
        math.ceil(_MIN_PATCH_PX * cols / width),
        math.ceil(_MIN_PATCH_PX * rows / height),
        1,
    )
    return min(need, _MAX_UPSCALE)


def _grid_lines(width: int, height: int, rows: int, cols: int) -> LineCollection:
    xs, ys = _edges(width, cols), _edges(height, rows)
    segments = [[(x, 0), (x, height)] for x in xs[1:-1]] + [[(0, y), (width, y)] for y in ys[1:-1]]
    return LineCollection(segments, colors=[(0.7, 0.7, 0.7, 0.5)], linewidths=0.4, zorder=3)


def build_overlay_figure(
    image: Image.Image,
    grid: tuple[int, int],
    kept: Mapping[int, Sequence[int]],
    title: str = "",
) -> tuple[Figure, list[Any]]:
    """The figure :func:`kept_patches_overlay` saves, and its panel axes in drawing order
    (``"input"`` first, then the layers ascending). Each panel shows the display image (the
    input upscaled by an integer factor with nearest neighbour when small) in data coordinates
    ``extent=(0, W, H, 0)``, so pixel ``(x, y)`` of the display image covers ``[x, x+1) x [y,
    y+1)`` in ``ax.transData``."""
    rows, cols = _check_grid(grid)
    num_patches = rows * cols
    rgb = _as_rgb(image)
    if not isinstance(kept, Mapping):
        raise ValueError(f"kept must map a decoder layer index to a list of kept visual-token indices, got {type(kept).__name__}")
    layers: dict[int, list[int]] = {}
    for layer, indices in kept.items():
        lidx = _as_int(layer, "kept: layer key")
        if lidx < 0:
            raise ValueError(f"kept: layer index must be non-negative, got {lidx}")
        if lidx in layers:
            raise ValueError(f"kept: layer {lidx} appears more than once")
        layers[lidx] = _check_indices(indices, num_patches, f"layer {lidx}")

    scale = _display_scale(rgb.width, rgb.height, rows, cols)
    display = rgb.resize((rgb.width * scale, rgb.height * scale), Image.Resampling.NEAREST) if scale > 1 else rgb
    width, height = display.size

    panels: list[tuple[str, Image.Image]] = [("input" if layers else "input (no pruning)", display)]
    for lidx in sorted(layers):
        panels.append((f"layer {lidx}: {len(layers[lidx])}/{num_patches} kept", dim_unkept(display, (rows, cols), layers[lidx])))

    n = len(panels)
    ncols = min(n, _PANELS_PER_ROW)
    nrows = math.ceil(n / ncols)
    aspect = height / width
    head = 0.35 if title else 0.0
    fig = _new_figure((_PANEL_IN * ncols, _PANEL_IN * aspect * nrows + 0.3 * nrows + head))
    if title:
        fig.suptitle(title, fontsize=10)
    axes = []
    for j, (label, img) in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, j + 1)
        ax.imshow(np.asarray(img), extent=(0, width, height, 0), interpolation="nearest", resample=False)
        ax.add_collection(_grid_lines(width, height, rows, cols))
        ax.set_xlim(0, width)
        ax.set_ylim(height, 0)
        ax.set_title(label, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        axes.append(ax)
    if not layers:
        axes[0].text(
            0.5, 0.04, "no pruning", transform=axes[0].transAxes, ha="center", va="bottom", fontsize=8,
            color="white", bbox={"facecolor": "black", "alpha": 0.6, "edgecolor": "none", "pad": 2},
        )
    fig.tight_layout()
    return fig, axes


def kept_patches_overlay(
    image: Image.Image,
    grid: tuple[int, int],
    kept: dict[int, list[int]],
    path: Path,
    title: str = "",
) -> Path:
    """One panel per pruning layer (ascending, after an ``"input"`` panel with the unmodified
    image) showing which visual-token patches that layer keeps: dropped patches are dimmed toward
    dark grey (75%, see :func:`dim_unkept`) and the patch grid is outlined lightly. ``image`` is
    the image as the vision tower saw it (already resized/cropped); ``grid = (rows, cols)`` is
    the tower's patch grid, token ``i`` at row ``i // cols``, column ``i % cols``. With an empty
    ``kept`` only the input is shown, noted "no pruning". Written as PNG; returns ``path``."""
    fig, _ = build_overlay_figure(image, grid, kept, title)
    return _save(fig, path)


# --------------------------------------------------------------------------- retention chart


def retention_chart(rows: Sequence[Mapping[str, Any]], path: Path, title: str) -> Path:
    """Line chart of ``quota-compile eval`` results: x the average keep ratio, y the retention in
    percent (accuracy / full-precision accuracy), one line per pruning method; the unpruned
    variants are horizontal reference lines. Where the rows carry ``retention_ci95`` (the
    bootstrap intervals of ``eval``), each point gets its interval as an error bar (methods
    nudged apart on x so that the bars do not overlap) and the quantized unpruned line a band.
    ``rows``: eval.json's ``variants`` (keys ``method``, ``keep_ratio``, ``retention``,
    ``label``). Written as a 600x320 PNG."""
    fig = _new_figure(_SCHEDULE_SIZE_IN)
    ax = fig.add_subplot(1, 1, 1)
    palette = {"quota": "#C44E52", "quota-fp": "#8172B3", "fastv": "#DD8452", "pdrop": "#55A868", "random": "#8C8C8C"}
    methods = sorted({r["method"] for r in rows if r["method"] != "none"}, key=lambda m: list(palette).index(m) if m in palette else 99)
    for r in rows:
        if r["method"] == "none" and r.get("retention") is not None:
            style = ":" if r["quantized"] else "-"
            ax.axhline(100 * r["retention"], color="#4C72B0", linestyle=style, linewidth=1.1, label=r["label"])
            ci = r.get("retention_ci95")
            if r["quantized"] and ci is not None:  # the FP32 line is 100 by definition
                ax.axhspan(100 * ci[0], 100 * ci[1], color="#4C72B0", alpha=0.12, linewidth=0)
    offsets = {m: (i - (len(methods) - 1) / 2) * 0.004 for i, m in enumerate(methods)}  # keep the bars apart
    for m in methods:
        pts = sorted(
            (r["keep_ratio"], 100 * r["retention"], r.get("retention_ci95"))
            for r in rows if r["method"] == m and r.get("retention") is not None
        )
        if pts:
            xs = [x + offsets[m] for x, _, _ in pts]
            ys = [y for _, y, _ in pts]
            color = palette.get(m, "#937860")
            ax.plot(xs, ys, marker="o", color=color, linewidth=1.5, label=m)
            if all(ci is not None for _, _, ci in pts):
                err = [[y - 100 * ci[0] for _, y, ci in pts], [100 * ci[1] - y for _, y, ci in pts]]
                ax.errorbar(xs, ys, yerr=err, fmt="none", ecolor=color, elinewidth=1.0, capsize=2.5)
    ax.set_xlabel("average share of visual tokens kept")
    ax.set_ylabel("retention (% of FP32 accuracy)")
    ax.set_title(title, fontsize=10)
    ax.grid(linewidth=0.4, alpha=0.5)
    ax.legend(loc="lower right", fontsize=7, framealpha=0.85)
    fig.tight_layout()
    return _save(fig, path)
