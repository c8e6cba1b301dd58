"""Pictures a person would rather look at than read: line plots and contact sheets, as PNG.

Pure NumPy + PIL (no plotting library), written through etils.epath (local or gs://),
atomically for local paths.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
from etils import epath

WHITE, BLACK, GREY = (255, 255, 255), (0, 0, 0), (200, 200, 200)
COLORS = ((200, 30, 30), (30, 90, 200), (30, 150, 60), (150, 60, 170), (230, 140, 20), (40, 40, 40))


def save_png(image, path) -> None:
    """PIL image -> PNG at `path` (written to a temporary name, then renamed, when local)."""
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp" if not str(path).startswith("gs://") else path
    with tmp.open("wb") as f:
        image.save(f, format="PNG")
    if tmp != path:
        tmp.replace(path)


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    step = (hi - lo) / max(n - 1, 1)
    return [lo + i * step for i in range(n)]


def line_plot(series: Sequence[tuple[str, Sequence[float], Sequence[float]]], path, *, title: str = "",
              xlabel: str = "", ylabel: str = "", size=(800, 320)) -> None:
    """[(label, xs, ys), ...] -> a PNG line plot with a marker at every point (one point shows)."""
    from PIL import Image, ImageDraw

    w, h = size
    left, right, top, bottom = 60, 20, 28, 42
    img = Image.new("RGB", (w, h), WHITE)
    d = ImageDraw.Draw(img)
    xs_all = [float(x) for _, xs, _ in series for x in xs]
    ys_all = [float(y) for _, _, ys in series for y in ys if math.isfinite(float(y))]
    x0, x1 = (min(xs_all), max(xs_all)) if xs_all else (0.0, 1.0)
    if x1 == x0:
        x0, x1 = x0 - 0.5, x1 + 0.5
    y0 = math.floor(min(ys_all) - 0.5) if ys_all else 0.0
    y1 = math.ceil(max(ys_all) + 0.5) if ys_all else 1.0
    px = lambda x: left + (w - left - right) * (float(x) - x0) / (x1 - x0)
    py = lambda y: (h - bottom) - (h - top - bottom) * (min(max(float(y), y0), y1) - y0) / max(y1 - y0, 1e-9)
    d.rectangle([left, top, w - right, h - bottom], outline=BLACK)
    for v in _ticks(y0, y1):
        d.line([(left, py(v)), (w - right, py(v))], fill=GREY)
        d.text((4, py(v) - 6), f"{v:.1f}", fill=BLACK)
    for v in _ticks(x0, x1):
        d.text((px(v) - 12, h - bottom + 6), f"{v:.0f}" if abs(v) >= 10 or v == int(v) else f"{v:.2f}", fill=BLACK)
    for k, (label, xs, ys) in enumerate(series):
        color = COLORS[k % len(COLORS)]
        points = [(px(x), py(y)) for x, y in zip(xs, ys) if math.isfinite(float(y))]
        if len(points) > 1:
            d.line(points, fill=color, width=2)
        for x, y in points:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
        if label:
            d.text((left + 8, top + 4 + 14 * k), label, fill=color)
    d.text((left, 6), title, fill=BLACK)
    d.text(((w - len(xlabel) * 6) // 2, h - 18), xlabel, fill=BLACK)
    d.text((4, 6), ylabel[:8], fill=BLACK)
    save_png(img, path)


def contact_sheet(originals: np.ndarray, reconstructions: np.ndarray, n_frames: np.ndarray, path, *,
                  frames: int = 4, scale: int = 0, labels: Optional[Sequence[str]] = None) -> None:
    """A PNG grid: one row per clip, `frames` frames spread over its valid length, each shown as
    original | reconstruction. originals / reconstructions: uint8 (B, T, H, W, 3)."""
    from PIL import Image, ImageDraw

    b, t, h, w, _ = originals.shape
    scale = scale or max(1, 96 // max(h, w))
    cell_h, cell_w, gap, head = h * scale, w * scale, 6, 16
    width = frames * (2 * cell_w + gap) + gap
    height = head + b * (cell_h + gap + 12) + gap
    sheet = Image.new("RGB", (width, height), WHITE)
    d = ImageDraw.Draw(sheet)
    d.text((gap, 2), "original | reconstruction", fill=BLACK)
    for i in range(b):
        n = int(n_frames[i]) if n_frames is not None else t
        picks = np.unique(np.linspace(0, max(n - 1, 0), frames).round().astype(int))
        y = head + i * (cell_h + gap + 12)
        d.text((gap, y), labels[i] if labels else f"clip {i} ({n} frames)", fill=BLACK)
        for j, f in enumerate(picks):
            x = gap + j * (2 * cell_w + gap)
            for k, video in enumerate((originals, reconstructions)):
                tile = Image.fromarray(np.asarray(video[i, f], np.uint8)).resize((cell_w, cell_h), Image.NEAREST)
                sheet.paste(tile, (x + k * cell_w, y + 12))
            d.text((x + 2, y + 12 + cell_h - 12), f"t={f}", fill=(255, 255, 0))
    save_png(sheet, path)
