"""What a run reports beside its losses: the trained vectors' norms against the vocabulary's, and a PNG of the curves.

Norms: an embedding whose vectors grow far beyond the norms of the model's own token embeddings starts to drown the
rest of the prompt. :class:`VocabularyNorms` holds the statistics of one text encoder's token-embedding table;
:func:`norm_report` gives each trained vector's norm, its z-score and whether it left the vocabulary's range.

The plot is drawn with PIL (already a dependency), one panel per group of curves, with the early-stop and best steps
marked as vertical lines.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class VocabularyNorms:
    """L2 norms of a token-embedding table's rows: mean, standard deviation, extremes and the 1st/99th percentiles."""

    mean: float
    std: float
    min: float
    max: float
    p01: float
    p99: float
    count: int

    @classmethod
    def of(cls, weight: torch.Tensor) -> "VocabularyNorms":
        norms = weight.detach().float().norm(dim=-1).cpu().double()
        q = torch.quantile(norms, torch.tensor([0.01, 0.99], dtype=torch.float64))
        return cls(float(norms.mean()), float(norms.std()) if norms.numel() > 1 else 0.0, float(norms.min()),
                   float(norms.max()), float(q[0]), float(q[1]), int(norms.numel()))

    def to_dict(self) -> dict:
        return asdict(self)


def norm_report(vectors: torch.Tensor, vocab: VocabularyNorms, prefix: str = "norm",
                factor: float = 1.0) -> tuple[dict, list[str]]:
    """Per-vector metrics ``{prefix}/{k}``, ``{prefix}_z/{k}`` and the list of vectors outside [vocab.min,
    factor x vocab.max], as messages. ``vectors`` [n, dim] (one text encoder's table)."""
    norms = vectors.detach().float().norm(dim=-1).cpu().tolist()
    metrics, outside = {}, []
    for k, n in enumerate(norms):
        metrics[f"{prefix}/{k}"] = n
        metrics[f"{prefix}_z/{k}"] = (n - vocab.mean) / vocab.std if vocab.std > 0 else 0.0
        if n > factor * vocab.max or n < vocab.min:
            side = ("below the smallest" if n < vocab.min else "above the largest" if factor == 1
                    else f"above {factor:g} x the largest")
            outside.append(f"vector {k} has norm {n:.3g}, {side} token embedding of the vocabulary "
                           f"({vocab.min:.3g}..{vocab.max:.3g}, mean {vocab.mean:.3g})")
    return metrics, outside


class NormWatch:
    """Warns once per vector when its norm first leaves the vocabulary's range (and says at which step).

    ``vocab`` is one VocabularyNorms, or one per text encoder ({"clip_l": ..., "clip_g": ...}) for vectors given as
    a dict with the same keys (SDXL); metrics are then named ``norm_clip_l/0`` etc. ``factor``: warn above
    factor x the largest vocabulary norm (1: as soon as the vector leaves the vocabulary's range)."""

    def __init__(self, vocab: VocabularyNorms | dict[str, VocabularyNorms], factor: float = 1.0):
        self.vocab = vocab
        self.factor = float(factor)
        self.warned: set[str] = set()

    def check(self, step: int, vectors) -> tuple[dict, list[str]]:
        tables = vectors if isinstance(vectors, dict) else {"": vectors}
        vocabs = self.vocab if isinstance(self.vocab, dict) else {"": self.vocab}
        metrics, new = {}, []
        for key, table in tables.items():
            found, outside = norm_report(table, vocabs[key], prefix=f"norm_{key}" if key else "norm",
                                         factor=self.factor)
            metrics.update(found)
            for line in outside:
                k = f"{key}/{line.split()[1].rstrip(',')}" if key else line.split()[1].rstrip(",")
                if k not in self.warned:
                    self.warned.add(k)
                    where = f"{key} " if key else ""
                    new.append(f"step {step}: {where}{line}; an embedding far beyond the vocabulary's norms can "
                               f"override the rest of a prompt: check the previews (an earlier step may be better)")
        return metrics, new

    @property
    def max_norm(self) -> float:
        vocabs = self.vocab.values() if isinstance(self.vocab, dict) else [self.vocab]
        return max(v.max for v in vocabs)

    def state_dict(self) -> dict:
        return {"warned": sorted(self.warned)}

    def load_state_dict(self, state: dict) -> None:
        self.warned = set(str(k) for k in state.get("warned", []))


# ---------------------------------------------------------------------------------------------------------------
# The plot

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values covering [lo, hi]."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"


def plot_curves(path: Path, panels: dict[str, dict[str, list[tuple[int, float]]]], marks: dict[str, int | None],
                title: str = "", width: int = 900, panel_height: int = 260) -> Path:
    """Write a PNG with one panel per entry of ``panels`` ({panel title: {curve name: [(step, value)]}}), all on one
    step axis, and a vertical line per entry of ``marks`` ({label: step}, e.g. "early stop", "best").
    Written to a temporary name and renamed."""
    from PIL import Image, ImageDraw, ImageFont

    from utils.fileio import atomic_path

    panels = {k: {n: [(int(s), float(v)) for s, v in c if math.isfinite(float(v))] for n, c in curves.items()}
              for k, curves in panels.items()}
    panels = {k: {n: c for n, c in curves.items() if c} for k, curves in panels.items()}
    panels = {k: curves for k, curves in panels.items() if curves}
    font = ImageFont.load_default()
    top, left, right, gap = (28 if title else 8), 70, 160, 36
    height = top + max(1, len(panels)) * (panel_height + gap)
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    if title:
        draw.text((left, 8), title, fill="black", font=font)
    steps = [s for curves in panels.values() for c in curves.values() for s, _ in c]
    steps += [s for s in marks.values() if s is not None]
    s_lo, s_hi = (min(steps), max(steps)) if steps else (0, 1)
    s_hi = s_hi if s_hi > s_lo else s_lo + 1
    s_hi += (s_hi - s_lo) * 0.02  # a line at the last step stays clear of the frame
    plot_w = width - left - right

    def x_of(step: float) -> float:
        return left + (step - s_lo) / (s_hi - s_lo) * plot_w

    for p, (name, curves) in enumerate(panels.items()):
        y0 = top + p * (panel_height + gap) + 14
        h = panel_height - 14
        values = [v for c in curves.values() for _, v in c]
        v_lo, v_hi = min(values), max(values)
        pad = (v_hi - v_lo) * 0.05 or abs(v_hi) * 0.05 or 1.0
        v_lo, v_hi = v_lo - pad, v_hi + pad

        def y_of(v: float) -> float:
            return y0 + h - (v - v_lo) / (v_hi - v_lo) * h

        draw.text((left, y0 - 14), name, fill="black", font=font)
        draw.rectangle([left, y0, left + plot_w, y0 + h], outline=(80, 80, 80))
        for t in _ticks(v_lo, v_hi):
            y = y_of(t)
            draw.line([left - 4, y, left, y], fill=(80, 80, 80))
            draw.line([left + 1, y, left + plot_w - 1, y], fill=(235, 235, 235))
            draw.text((4, y - 6), _fmt(t), fill="black", font=font)
        for t in _ticks(s_lo, s_hi, 8):
            x = x_of(t)
            draw.line([x, y0 + h, x, y0 + h + 4], fill=(80, 80, 80))
            draw.text((x - 10, y0 + h + 6), _fmt(t), fill="black", font=font)
        for (label, step), colour in zip(marks.items(), [(200, 0, 0), (0, 140, 0), (0, 0, 200), (120, 120, 0)]):
            if step is not None:
                x = x_of(step)
                for y in range(int(y0), int(y0 + h), 6):  # dashed
                    draw.line([x, y, x, min(y + 3, y0 + h)], fill=colour)
                if p == 0:
                    text = f"{label} {step}"
                    tw = draw.textlength(text, font=font)
                    # labels right of the line, or left of it in the right half of the plot
                    tx = x + 3 if x < left + plot_w / 2 else x - 3 - tw
                    draw.text((tx, y0 + 2 + 12 * list(marks).index(label)), text, fill=colour, font=font)
        for k, (curve, points) in enumerate(curves.items()):
            colour = COLOURS[k % len(COLOURS)]
            xy = [(x_of(s), y_of(v)) for s, v in sorted(points)]
            if len(xy) == 1:
                draw.ellipse([xy[0][0] - 2, xy[0][1] - 2, xy[0][0] + 2, xy[0][1] + 2], fill=colour)
            else:
                draw.line(xy, fill=colour, width=2)
            ly = y0 + 4 + 14 * k
            draw.line([left + plot_w + 10, ly + 6, left + plot_w + 28, ly + 6], fill=colour, width=2)
            draw.text((left + plot_w + 32, ly), curve[:20], fill="black", font=font)
    path = Path(path)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return path
