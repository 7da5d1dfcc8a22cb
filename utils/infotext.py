"""A1111's generation "infotext" (the PNG ``parameters`` text chunk; docs/a1111-rules.md, "Infotext"): write, read,
save.

Layout::

    <prompt>
    Negative prompt: <negative>          (only when there is one)
    Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, Model hash: …, Model: …

A value holding ``,``, ``:`` or a newline is written as a JSON string; a value equal to its key is written bare; None is
left out. Keys follow A1111's order; keys we do not know keep their place after the known key that preceded them.
"""

from __future__ import annotations

import json
import os
import re

from utils.fileio import atomic_path

PNG_KEY = "parameters"
NEGATIVE_PREFIX = "Negative prompt:"

KEY_ORDER = [
    "Steps", "Sampler", "Schedule type", "CFG scale", "Image CFG scale", "Seed", "Face restoration", "Size",
    "Model hash", "Model", "VAE hash", "VAE", "Variation seed", "Variation seed strength", "Seed resize from",
    "Denoising strength", "Conditional mask weight", "Clip skip", "ENSD", "Token merging ratio",
    "Token merging ratio hr", "Init image hash", "RNG", "Tiling", "TI hashes", "Hypernet", "Hypernet hash",
    "Hypernet strength", "Emphasis", "Version",
]
_RANK = {k: i for i, k in enumerate(KEY_ORDER)}
_KEY_RE = re.compile(r"\w[\w \-/+.()]*$")


def quote(value: str) -> str:
    if any(c in value for c in ",:\n"):
        return json.dumps(value, ensure_ascii=False)
    return value


def _ordered(params: dict) -> list[tuple[str, object]]:
    ranked = []
    rank = -1.0
    for i, (key, value) in enumerate(params.items()):
        if key in _RANK:
            rank = float(_RANK[key])
        ranked.append((rank, key in _RANK, i, key, value))  # unknown keys ride behind the previous known key
    ranked.sort(key=lambda r: (r[0], not r[1], r[2]))
    return [(key, value) for _, _, _, key, value in ranked]


def format_params(params: dict) -> str:
    parts = []
    for key, value in _ordered(params):
        if value is None:
            continue
        text = str(value)
        parts.append(key if text == key else f"{key}: {quote(text)}")
    return ", ".join(parts)


def format_infotext(prompt: str, negative_prompt: str | None, params: dict) -> str:
    negative = f"\n{NEGATIVE_PREFIX} {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{format_params(params)}".strip()


def _read_json_string(line: str, start: int) -> tuple[str, int]:
    """Decode the JSON string starting at ``line[start] == '"'``; returns (value, index after it)."""
    i = start + 1
    while i < len(line):
        if line[i] == "\\":
            i += 2
            continue
        if line[i] == '"':
            return json.loads(line[start : i + 1]), i + 1
        i += 1
    raise ValueError("unterminated quoted value")


def parse_params(line: str) -> dict[str, str]:
    """``Key: value, Key: "quoted, value", Bare`` -> dict (values as strings; a bare entry maps to itself)."""
    params: dict[str, str] = {}
    i, n = 0, len(line)
    while i < n:
        while i < n and line[i] in " ,":
            i += 1
        if i >= n:
            break
        j = i
        while j < n and line[j] not in ":,":
            j += 1
        key = line[i:j].strip()
        if j >= n or line[j] == ",":
            params[key] = key
            i = j + 1
            continue
        j += 1
        while j < n and line[j] == " ":
            j += 1
        if j < n and line[j] == '"':
            try:
                value, j = _read_json_string(line, j)
            except ValueError:
                value, j = line[j:], n
            k = line.find(",", j)
            j = n if k < 0 else k
        else:
            k = line.find(",", j)
            k = n if k < 0 else k
            value, j = line[j:k].strip(), k
        params[key] = value
        i = j + 1
    return params


def _looks_like_params(line: str) -> bool:
    try:
        params = parse_params(line)
    except ValueError:
        return False
    real = [k for k, v in params.items() if v != k and _KEY_RE.match(k)]
    # A1111 wants at least three "Key: value" entries; a "Steps: N" entry alone is also unmistakable.
    return len(real) >= 3 or params.get("Steps", "Steps").isdigit()


def parse_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """The inverse of :func:`format_infotext`: (prompt, negative prompt, params as strings)."""
    lines = text.strip().split("\n")
    params: dict[str, str] = {}
    if lines and _looks_like_params(lines[-1]):
        params = parse_params(lines.pop())
    prompt_lines, negative_lines = [], []
    in_negative = False
    for line in lines:
        if not in_negative and line.startswith(NEGATIVE_PREFIX):
            in_negative = True
            line = line[len(NEGATIVE_PREFIX):].lstrip(" ")
        (negative_lines if in_negative else prompt_lines).append(line)
    return "\n".join(prompt_lines), "\n".join(negative_lines), params


def parse_size(value: str) -> tuple[int, int]:
    w, h = value.lower().split("x")
    return int(w), int(h)


def save_png(image, path: str | os.PathLike, infotext: str | None) -> None:
    """Write ``image`` as PNG with the infotext in a ``parameters`` chunk (tEXt, or iTXt when not latin-1), atomically."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if infotext:
        info.add_text(PNG_KEY, infotext)  # Pillow picks iTXt itself for text latin-1 cannot hold
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)


def read_infotext(path: str | os.PathLike) -> str | None:
    from PIL import Image

    with Image.open(path) as im:
        return im.info.get(PNG_KEY) if hasattr(im, "info") else None
