"""Embeddings carried inside images, as A1111 writes and reads them (docs/a1111-rules.md, "Embeddings inside images").

Two independent copies of the same payload live in one PNG:

* a ``tEXt`` chunk ``sd-ti-embedding``: base64 of the JSON of the A1111 ``.pt`` dict, tensors written as
  ``{"TORCHTENSOR": [...]}``;
* the pixels: the zlib-compressed JSON split into low and high nibbles, each nibble array laid out as an RGB block
  left and right of the card image (one black separator column each), its low nibble XOR-ed with a mod-255 LCG
  stream and its high nibble carrying a decorative dot pattern.

This module only knows payload dicts (``{"string_to_param": {"*": tensor}, "name": ..., ...}``) and images; turning
them into :class:`utils.embeddings.Embedding` objects is ``utils.embeddings``' job. Every decoder here is bounded
(payload size, base64 length, JSON nesting), because embedding folders are filled with files from the internet.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import warnings
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


TEXT_KEY = "sd-ti-embedding"
TENSOR_KEY = "TORCHTENSOR"

# A 75-vector SD-2 embedding is ~1.7 MB of JSON; 16 MiB leaves room for anything real and bounds a hostile file.
MAX_PAYLOAD_BYTES = 16 << 20
MAX_TEXT_CHARS = (MAX_PAYLOAD_BYTES // 3 + 1) * 4
# Real payloads nest 5 deep (dict > dict > dict > list > list).
MAX_JSON_DEPTH = 16
# Real cards are a preview picture (512-2048 px a side) between two narrow data blocks. Pixels are decoded only up to
# this budget (far below the limit for training pictures), so a file in an embeddings folder costs at most ~70 MB.
MAX_CARD_PIXELS = 4096 * 4096
STRIP_ROWS = 64

_LCG_A = 1664525
_LCG_C = 1013904223
_MASK32 = 0xFFFFFFFF


class PayloadError(ValueError):
    """The image claims to carry an embedding but its payload is broken, too large or not what A1111 writes."""


@dataclass(frozen=True)
class DecodeLimits:
    max_payload_bytes: int = MAX_PAYLOAD_BYTES
    max_text_chars: int = MAX_TEXT_CHARS
    max_json_depth: int = MAX_JSON_DEPTH


DEFAULT_LIMITS = DecodeLimits()


# ---------------------------------------------------------------------------------------------------------------------
# JSON with tensors


class _TensorEncoder(json.JSONEncoder):
    def default(self, o: Any) -> Any:
        if isinstance(o, torch.Tensor):
            # float32 -> Python float keeps the exact value; json then prints its shortest double repr like A1111.
            return {TENSOR_KEY: o.detach().cpu().numpy().tolist()}
        return super().default(o)


def payload_to_json_bytes(data: dict) -> bytes:
    """The JSON A1111 writes: ``json.dumps`` defaults (", " / ": " separators, ASCII), tensors as TORCHTENSOR lists."""
    return json.dumps(data, cls=_TensorEncoder).encode("utf-8")


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)


def json_nesting_depth(raw: bytes) -> int:
    """Deepest ``[``/``{`` nesting in a JSON text, ignoring brackets inside strings; linear time, no recursion."""
    skeleton = np.frombuffer(_JSON_STRING.sub(b'""', raw), dtype=np.uint8)
    if skeleton.size == 0:
        return 0
    step = np.isin(skeleton, (ord("["), ord("{"))).astype(np.int64) - np.isin(skeleton, (ord("]"), ord("}")))
    return int(np.cumsum(step).max(initial=0))


def _tensor_hook(obj: dict) -> Any:
    if TENSOR_KEY in obj:
        try:
            # A1111 builds float64 tensors here; callers convert to float32.
            arr = np.array(obj[TENSOR_KEY], dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise PayloadError(f"a tensor in the payload is not a rectangular list of numbers ({e})") from None
        return torch.from_numpy(arr)
    return obj


def json_bytes_to_payload(raw: bytes, limits: DecodeLimits = DEFAULT_LIMITS) -> dict:
    if len(raw) > limits.max_payload_bytes:
        raise PayloadError(f"payload is {len(raw)} bytes, more than the limit of {limits.max_payload_bytes}")
    depth = json_nesting_depth(raw)
    if depth > limits.max_json_depth:
        raise PayloadError(f"payload JSON nests {depth} levels deep (limit {limits.max_json_depth})")
    try:
        data = json.loads(raw.decode("utf-8"), object_hook=_tensor_hook)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PayloadError(f"payload is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise PayloadError("payload JSON is not an object")
    return data


# ---------------------------------------------------------------------------------------------------------------------
# Text chunk


def encode_text_payload(data: dict) -> str:
    return base64.b64encode(payload_to_json_bytes(data)).decode("ascii")


def decode_text_payload(text: str | bytes, limits: DecodeLimits = DEFAULT_LIMITS) -> dict:
    if len(text) > limits.max_text_chars:
        raise PayloadError(f"'{TEXT_KEY}' text is {len(text)} characters, "
                           f"more than the limit of {limits.max_text_chars}")
    try:
        raw = base64.b64decode(text)
    except (binascii.Error, ValueError) as e:
        raise PayloadError(f"'{TEXT_KEY}' text is not valid base64 ({e})") from None
    return json_bytes_to_payload(raw, limits)


# ---------------------------------------------------------------------------------------------------------------------
# Pixel payload


def lcg_values(n: int) -> np.ndarray:
    """The first ``n`` outputs (``state mod 255``) of A1111's LCG seeded with 0, as uint8."""
    out = np.empty(n, dtype=np.uint64)
    chunk = 1024
    state = 0
    for i in range(min(n, chunk)):
        state = (_LCG_A * state + _LCG_C) & _MASK32
        out[i] = state
    if n > chunk:
        # Jump ahead a whole chunk at a time: chunk steps of s -> a*s + c compose to s -> A*s + C (mod 2^32).
        big_a, big_c = 1, 0
        for _ in range(chunk):
            big_a, big_c = (_LCG_A * big_a) & _MASK32, (_LCG_A * big_c + _LCG_C) & _MASK32
        big_a, big_c = np.uint64(big_a), np.uint64(big_c)
        for start in range(chunk, n, chunk):
            stop = min(start + chunk, n)
            prev = out[start - chunk : stop - chunk]
            out[start:stop] = (prev * big_a + big_c) & np.uint64(_MASK32)  # uint64 wraps mod 2^64; low 32 bits exact
    return (out % np.uint64(255)).astype(np.uint8)


def xor_block(block: np.ndarray) -> np.ndarray:
    """XOR the low nibble of every byte (C order) with a fresh LCG stream; its own inverse."""
    mask = lcg_values(block.size).reshape(block.shape) & 0x0F
    return block ^ mask


def edge_style_sequence(first_row: torch.Tensor) -> np.ndarray:
    """Grey shades for the dot decoration: |v| / max|v| * 255 of the first vector's first 1024 values, truncated."""
    values = np.abs(np.asarray(first_row.detach().cpu().reshape(-1)[:1024].tolist(), dtype=np.float64))
    peak = values.max(initial=0.0)
    if not peak > 0:  # an all-zero (fresh) embedding: A1111 would divide by zero; plain black dots do the same job
        return np.zeros(max(values.size, 1), dtype=np.uint8)
    return (values / peak * 255).astype(np.uint8)


def style_block(block: np.ndarray, sequence: np.ndarray) -> np.ndarray:
    """Put a pattern of grey dots into the high nibble of an (H, w, 3) block (cosmetic; decoders ignore it)."""
    height, width = block.shape[:2]
    canvas = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(canvas)
    i = 0
    for x in range(-6, width, 8):
        for row, y in enumerate(range(-6, height, 8)):
            shift = 4 if row % 2 == 0 else 0  # staggered rows
            shade = int(sequence[i % len(sequence)])
            i += 1
            draw.ellipse((x + shift, y, x + 6 + shift, y + 6), fill=(shade, shade, shade))
    return block ^ (np.asarray(canvas, dtype=np.uint8) & 0xF0)


def _round_up_past(n: int, m: int) -> int:
    # A1111 always adds at least one element: a length that is already a multiple of m gets a whole extra m.
    return n + (m - n % m)


def _pad(arr: np.ndarray, length: int, padding: str) -> np.ndarray:
    if padding == "cyclic":  # newest A1111 (numpy.resize semantics)
        return np.resize(arr, length)
    if padding == "zero":  # what the A1111 test fixture was written with
        out = np.zeros(length, dtype=arr.dtype)
        out[: arr.size] = arr
        return out
    raise ValueError(f"padding must be 'cyclic' or 'zero', not {padding!r}")


def blocks_from_compressed(compressed: bytes, height: int, sequence: np.ndarray,
                           padding: str = "cyclic") -> tuple[np.ndarray, np.ndarray]:
    """Lay out already-compressed payload bytes as the low- and high-nibble blocks, each (height, w, 3) uint8."""
    raw = np.frombuffer(compressed, dtype=np.uint8)
    length = _round_up_past(_round_up_past(raw.size, height), height * 3)
    low = _pad(raw & 0x0F, length, padding).reshape(height, -1, 3)
    high = _pad(raw >> 4, length, padding).reshape(height, -1, 3)
    return xor_block(style_block(low, sequence)), xor_block(style_block(high, sequence[::-1]))


def encode_pixel_blocks(data: dict, height: int, padding: str = "cyclic") -> tuple[np.ndarray, np.ndarray]:
    """The two data blocks for a payload dict with ``string_to_param`` (zlib level 9 of its JSON, as A1111)."""
    first = next(iter(data["string_to_param"].values()))
    sequence = edge_style_sequence(first[0] if first.ndim > 1 else first)
    compressed = zlib.compress(payload_to_json_bytes(data), level=9)
    return blocks_from_compressed(compressed, height, sequence, padding)


def compose_card(image: Image.Image, low: np.ndarray, high: np.ndarray) -> Image.Image:
    """``[low block][black column][image][black column][high block]`` on a black RGB canvas."""
    block_w = low.shape[1]
    out = Image.new("RGB", (image.width + 2 * block_w + 2, image.height), (0, 0, 0))
    out.paste(Image.fromarray(low, "RGB"), (0, 0))
    out.paste(image.convert("RGB"), (block_w + 1, 0))
    out.paste(Image.fromarray(high, "RGB"), (block_w + 1 + image.width + 1, 0))
    return out


def insert_pixel_payload(image: Image.Image, data: dict, padding: str = "cyclic") -> Image.Image:
    """The card with the payload's data blocks on both sides (RGB; any alpha is dropped, as A1111 does)."""
    low, high = encode_pixel_blocks(data, image.height, padding)
    return compose_card(image, low, high)


def _looks_like_zlib(head: bytes) -> bool:
    return len(head) >= 2 and head[0] & 0x0F == 8 and (head[0] << 8 | head[1]) % 31 == 0


def _inflate_bounded(raw: bytes, limit: int) -> bytes:
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(raw, limit)
    except zlib.error as e:
        raise PayloadError(f"pixel payload is not a valid zlib stream ({e})") from None
    if not inflater.eof:
        if inflater.unconsumed_tail:
            raise PayloadError(f"pixel payload inflates to more than the limit of {limit} bytes")
        raise PayloadError("pixel payload zlib stream is truncated")
    return out


def _strips(image: Image.Image, box: tuple[int, int, int, int]):
    """(top, RGB uint8 array) for ``box`` in bands of STRIP_ROWS rows: never a full-size copy of the picture."""
    left, top, right, bottom = box
    for y in range(top, bottom, STRIP_ROWS):
        yield y, np.asarray(image.crop((left, y, right, min(y + STRIP_ROWS, bottom))).convert("RGB"), dtype=np.uint8)


def _region(image: Image.Image, box: tuple[int, int, int, int]) -> np.ndarray:
    return np.asarray(image.crop(box).convert("RGB"), dtype=np.uint8)


def extract_pixel_payload(image: Image.Image, limits: DecodeLimits = DEFAULT_LIMITS) -> dict | None:
    """Decode the pixel copy, or None when the image has no data blocks (a plain picture).

    The picture is cropped to its box of non-black pixels (black: any channel 0); inside it, the first and last
    columns whose low nibbles are all 0 separate the two data blocks from the card image. Read in bands of rows, so
    the memory beyond the decoded picture is one band plus the two data blocks."""
    width, height = image.size
    rows_lit, cols_lit = np.zeros(height, dtype=bool), np.zeros(width, dtype=bool)
    for y, band in _strips(image, (0, 0, width, height)):
        lit = (band > 0).all(axis=2)
        rows_lit[y:y + lit.shape[0]] = lit.any(axis=1)
        cols_lit |= lit.any(axis=0)
    rows, cols = np.flatnonzero(rows_lit), np.flatnonzero(cols_lit)
    if rows.size == 0:
        return None
    box = (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)
    low_sums = np.zeros(box[2] - box[0], dtype=np.int64)
    for _, band in _strips(image, box):
        low_sums += (band & 0x0F).sum(axis=(0, 2), dtype=np.int64)
    empty_cols = np.flatnonzero(low_sums == 0)
    if empty_cols.size < 2:
        return None
    left_box = (box[0], box[1], box[0] + int(empty_cols[0]), box[3])
    right_box = (box[0] + int(empty_cols[-1]) + 1, box[1], box[2], box[3])
    block_width = left_box[2] - left_box[0]
    if block_width == 0 or block_width != right_box[2] - right_box[0]:
        return None  # black columns, but not two equal data blocks: not an embedding card
    first = (box[1], box[1] + 1)
    head_low = _region(image, (left_box[0], first[0], left_box[0] + 1, first[1])).reshape(-1)[:2] & 0x0F
    head_high = _region(image, (right_box[0], first[0], right_box[0] + 1, first[1])).reshape(-1)[:2] & 0x0F
    mask = lcg_values(2) & 0x0F
    if not _looks_like_zlib((((head_high ^ mask) << 4) | (head_low ^ mask)).tobytes()):
        return None  # a picture that happens to contain black columns
    rows_in_box = box[3] - box[1]
    block_bytes = rows_in_box * block_width * 3
    # A1111 pads the compressed payload by at most a column and a bit; anything bigger is not a payload we accept.
    if block_bytes > limits.max_payload_bytes + 6 * rows_in_box:
        raise PayloadError(f"pixel data blocks hold {block_bytes} bytes, more than the limit of "
                           f"{limits.max_payload_bytes}")
    left = _region(image, left_box) & 0x0F
    right = _region(image, right_box) & 0x0F
    raw = ((xor_block(right) << 4) | xor_block(left)).tobytes()
    return json_bytes_to_payload(_inflate_bounded(raw, limits.max_payload_bytes), limits)


# ---------------------------------------------------------------------------------------------------------------------
# Reading an image file


class CardTooLarge(ValueError):
    """An image over the decode budget for embedding cards: its pixels are not checked for a payload."""


def read_image_payload(path, limits: DecodeLimits | None = None,
                       max_pixels: int = MAX_CARD_PIXELS) -> tuple[dict, str] | None:
    """``(payload, "text" | "pixels")`` from an image file, text chunk first; None if it carries no embedding.

    A text chunk before the pixel data (where A1111, through Pillow, writes it) is read with the header, without
    decoding any pixels. Pixels are decoded only for pictures of at most ``max_pixels``; a larger one raises
    CardTooLarge.
    Raises PayloadError for a broken payload and OSError/PIL errors for a file that is not a readable image.
    """
    limits = limits or DEFAULT_LIMITS
    with warnings.catch_warnings():
        # Our budget, checked before any decoding, is far below Pillow's warning level (its error level still holds).
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            text = img.info.get(TEXT_KEY)
            if text:
                return decode_text_payload(text, limits), "text"
            if img.width * img.height > max_pixels:
                raise CardTooLarge(f"{img.width}x{img.height} pixels, over the {max_pixels}-pixel budget for "
                                   f"embedding cards; its pixels were not read")
            img.load()  # PNG text chunks after the image data are only seen once it is loaded
            text = (getattr(img, "text", None) or {}).get(TEXT_KEY) or img.info.get(TEXT_KEY)
            if text:
                return decode_text_payload(text, limits), "text"
            data = extract_pixel_payload(img, limits)
    return (data, "pixels") if data is not None else None


# ---------------------------------------------------------------------------------------------------------------------
# The card picture (cosmetic)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow without FreeType only has the fixed bitmap font
        return ImageFont.load_default()


def _fit_font_size(draw: ImageDraw.ImageDraw, text: str, width: float, start: int = 32, cap: int = 72) -> int:
    if not text:
        return cap
    measured = draw.textlength(text, font=_font(start)) or 1
    return max(8, min(cap, int(start * width / measured)))


def caption_card(image: Image.Image, title: str, footer_left: str = "", footer_mid: str = "",
                 footer_right: str = "") -> Image.Image:
    """Darken the top and bottom of ``image`` and write a title and a three-part footer in white (RGBA result)."""
    card = image.convert("RGBA")
    w, h = card.size
    # Opacity rises towards both edges so white text stays readable on any picture.
    ramp = [int(255 * max(1 - math.cos(y / h * 1.5), 1 - math.cos((h - y) / h * 1.65))) for y in range(h)]
    shade = Image.new("RGBA", (1, h))
    shade.putdata([(0, 0, 0, max(0, min(255, a))) for a in ramp])
    card = Image.alpha_composite(card, shade.resize((w, h)))
    draw = ImageDraw.Draw(card)
    pad = 10
    white = (255, 255, 255, 230)
    draw.text((pad, pad), title, font=_font(_fit_font_size(draw, title, w * 0.75 - pad * 4)), fill=white, anchor="lt")
    footers = [footer_left, footer_mid, footer_right]
    size = min(_fit_font_size(draw, t, w / 3 - pad) for t in footers)
    font = _font(size)
    y = h - pad
    draw.text((pad, y), footer_left, font=font, fill=white, anchor="ls")
    draw.text((w / 2, y), footer_mid, font=font, fill=white, anchor="ms")
    draw.text((w - pad, y), footer_right, font=font, fill=white, anchor="rs")
    return card


def default_card_background(vectors: torch.Tensor, size: int = 512) -> Image.Image:
    """A picture for cards made without a preview image: the vectors as a coloured band pattern (deterministic)."""
    v = vectors.detach().float().cpu()
    v = (v - v.min()) / (v.max() - v.min() + 1e-12)
    rows = v.shape[0]
    cols = int(math.ceil(v.shape[1] / 3))
    flat = torch.nn.functional.pad(v.reshape(-1), (0, rows * cols * 3 - v.numel())).reshape(rows, cols, 3)
    # Lift away from pure black: black columns inside the card would not break decoding, but look like separators.
    arr = (40 + flat.numpy() * 180).astype(np.uint8)
    return Image.fromarray(arr, "RGB").resize((size, size), Image.Resampling.NEAREST)
