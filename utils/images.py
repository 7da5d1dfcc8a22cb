"""Opening user images safely and turning every PIL mode into RGB (plus an optional alpha mask)."""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".jxl", ".avif"}

# Pixels above this are refused before decoding (a "decompression bomb" would otherwise exhaust memory). Pillow's
# own guard would fire first at ~89M pixels with its wording; ours replaces it.
MAX_IMAGE_PIXELS = 16384 * 16384
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS


class ImageLoadError(Exception):
    """An input file that is not a usable image; the message is the reason, for skip reports."""


@dataclass
class LoadedImage:
    rgb: Image.Image  # mode "RGB", EXIF orientation applied
    alpha: Image.Image | None  # mode "L" when the source had transparency


def is_image_file(path: str | os.PathLike) -> bool:
    return os.path.splitext(str(path))[1].lower() in IMAGE_EXTENSIONS


def _to_8bit(img: Image.Image) -> Image.Image:
    # 16/32-bit greyscale: scale the real range down to 8 bits instead of clipping at 255.
    arr = np.asarray(img, dtype=np.float64)
    hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
    return Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")


def to_rgb_and_alpha(img: Image.Image) -> LoadedImage:
    """Convert any PIL mode to RGB, keeping transparency (RGBA, LA, P with tRNS) as a separate L mask."""
    if getattr(img, "n_frames", 1) > 1:
        img.seek(0)  # animated: first frame
    img = ImageOps.exif_transpose(img)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        img = _to_8bit(img)
    elif img.mode == "CMYK":
        img = img.convert("RGB")
    alpha = None
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        alpha = img.getchannel("A")
        # Composite over white rather than dropping alpha: transparent pixels keep whatever colour they stored,
        # which is often garbage; white is what users see in viewers.
        base = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(base, img.convert("RGBA")).convert("RGB")
    else:
        img = img.convert("RGB")
    return LoadedImage(img, alpha)


def open_image(path: str | os.PathLike) -> LoadedImage:
    """Open and fully decode an image, or raise ImageLoadError saying why it cannot be used."""
    path = str(path)
    try:
        if os.path.getsize(path) == 0:
            raise ImageLoadError("empty file")
    except OSError as e:
        raise ImageLoadError(f"cannot read: {e.strerror or e}") from None
    return _decode(path)


def _too_large(e: Exception) -> str:
    found = re.search(r"\((\d+) pixels\)", str(e))
    declared = f"{found.group(1)} pixels" if found else "too many pixels"
    return f"image too large ({declared} declared in its header; limit {MAX_IMAGE_PIXELS})"


@contextmanager
def _opened(source, refuse_empty: bool = False) -> Iterator[Image.Image]:
    """``Image.open`` with our limits: an image whose header declares more than MAX_IMAGE_PIXELS is refused before
    its pixels are read, and every way Pillow fails (also inside the ``with`` body) becomes one ImageLoadError."""
    try:
        if refuse_empty and os.path.getsize(source) == 0:
            raise ImageLoadError("empty file")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                w, h = img.size
                if w * h > MAX_IMAGE_PIXELS:
                    raise ImageLoadError(f"image too large ({w}x{h} pixels; limit {MAX_IMAGE_PIXELS})")
                yield img
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # Pillow refuses a header that declares far more pixels than our limit while opening it.
        raise ImageLoadError(_too_large(e)) from None
    except Image.UnidentifiedImageError:
        raise ImageLoadError("not an image") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageLoadError(f"corrupt or truncated image ({e})") from None


def _decode(source) -> LoadedImage:
    """Decode a path or file object fully, refusing oversized images before their pixels are read."""
    with _opened(source) as img:
        img.load()
        return to_rgb_and_alpha(img)


# ---------------------------------------------------------------------------------------------------------------------
# Sizing for training: exact resize (A1111), fit-and-crop (center or random), aspect-ratio buckets.
# Geometry is planned from the source size alone (no pixels), so a latent-cache key can be computed before decoding.

RESAMPLE = Image.Resampling.BICUBIC


@dataclass(frozen=True)
class Geometry:
    """How one source image becomes a training image: resize to ``resize`` (w, h), then crop ``target`` (w, h) at
    ``left``/``top`` (in resized pixels), then optionally mirror left-right."""

    source: tuple[int, int]
    resize: tuple[int, int]
    left: int
    top: int
    target: tuple[int, int]
    flip: bool = False

    def key(self) -> str:
        return (f"src{self.source[0]}x{self.source[1]}-rs{self.resize[0]}x{self.resize[1]}-crop{self.left},{self.top}"
                f"-tgt{self.target[0]}x{self.target[1]}-flip{int(self.flip)}")


def plan_geometry(source: tuple[int, int], target: tuple[int, int], crop: str = "none", rng=None,
                  flip: bool = False) -> Geometry:
    """Plan the resize/crop from ``source`` (w, h) to ``target`` (w, h).

    ``crop="none"`` stretches to exactly the target like A1111 (aspect ratio not kept). ``"center"``/``"random"``
    scale the image so it covers the target (aspect kept) and cut the target out of the middle or at a place drawn
    from ``rng`` (a ``numpy.random.Generator``)."""
    sw, sh = source
    tw, th = target
    if crop == "none":
        return Geometry(source, (tw, th), 0, 0, (tw, th), flip)
    scale = max(tw / sw, th / sh)
    # Round, but never below the target: a 1-pixel shortfall would make the crop fall outside the image.
    rw, rh = max(tw, round(sw * scale)), max(th, round(sh * scale))
    if crop == "center":
        left, top = (rw - tw) // 2, (rh - th) // 2
    elif crop == "random":
        if rng is None:
            raise ValueError("random crop needs an rng")
        left, top = int(rng.integers(0, rw - tw + 1)), int(rng.integers(0, rh - th + 1))
    else:
        raise ValueError(f"unknown crop mode {crop!r}")
    return Geometry(source, (rw, rh), left, top, (tw, th), flip)


def apply_geometry(img: Image.Image, geom: Geometry, resample=RESAMPLE) -> Image.Image:
    """Resize, crop and flip a PIL image (RGB or an L alpha mask) as planned by ``plan_geometry``."""
    if img.size != geom.source:
        raise ValueError(f"image is {img.size}, geometry was planned for {geom.source}")
    if img.size != geom.resize:
        img = img.resize(geom.resize, resample=resample)
    tw, th = geom.target
    if (geom.left, geom.top) != (0, 0) or img.size != geom.target:
        img = img.crop((geom.left, geom.top, geom.left + tw, geom.top + th))
    if geom.flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return img


def make_buckets(max_area: int, min_reso: int, max_reso: int, step: int) -> list[tuple[int, int]]:
    """Bucket sizes (w, h): multiples of ``step`` within [min_reso, max_reso] on each side and at most ``max_area``
    pixels, the largest height for each width (and the transposed sizes), plus the biggest square."""
    if step <= 0 or min_reso <= 0 or max_reso < min_reso:
        raise ValueError(f"bad bucket settings: min {min_reso}, max {max_reso}, step {step}")
    buckets: set[tuple[int, int]] = set()
    side = min(max_reso, int(max_area**0.5) // step * step)
    if side >= min_reso:
        buckets.add((side, side))
    w = (min_reso + step - 1) // step * step
    while w <= max_reso:
        h = min(max_reso, max_area // w // step * step)
        if h >= min_reso:
            buckets.add((w, h))
            buckets.add((h, w))
        w += step
    if not buckets:
        raise ValueError(f"no bucket fits: area {max_area}, min {min_reso}, max {max_reso}, step {step}")
    return sorted(buckets)


def select_bucket(size: tuple[int, int], buckets: list[tuple[int, int]], *, no_upscale: bool = False,
                  max_area: int | None = None, step: int = 64) -> tuple[int, int]:
    """The bucket for an image of ``size`` (w, h): the one with the closest aspect ratio (ties: larger area).

    With ``no_upscale``, an image smaller than ``max_area`` gets its own size rounded down to ``step`` instead (it is
    never enlarged), and a larger one is scaled down to ``max_area`` keeping its aspect ratio, then rounded down."""
    import math

    w, h = size
    if no_upscale:
        area = max_area if max_area is not None else max(bw * bh for bw, bh in buckets)
        scale = min(1.0, math.sqrt(area / (w * h)))
        return (max(step, int(w * scale) // step * step), max(step, int(h * scale) // step * step))
    aspect = math.log(w / h)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), -b[0] * b[1]))


def _header_orientation(img: Image.Image) -> int:
    # PNG's getexif() decodes the whole image to reach an eXIf chunk stored after the pixels; read only what the
    # header already gave us (an eXIf before IDAT), which keeps the scan cheap.
    if img.format == "PNG":
        raw = img.info.get("exif")
        if not raw:
            return 1
        exif = Image.Exif()
        exif.load(raw)
        return exif.get(0x0112, 1)
    return img.getexif().get(0x0112, 1)


def image_size(path_or_bytes) -> tuple[int, int]:
    """(w, h) after EXIF orientation, read from the header only (no full decode); raises ImageLoadError."""
    import io

    in_memory = isinstance(path_or_bytes, (bytes, bytearray))
    with _opened(io.BytesIO(path_or_bytes) if in_memory else path_or_bytes, refuse_empty=not in_memory) as img:
        w, h = img.size
        return (h, w) if _header_orientation(img) in (5, 6, 7, 8) else (w, h)


def open_image_bytes(data: bytes) -> LoadedImage:
    """``open_image`` for in-memory bytes (dataset columns, tar members)."""
    import io

    if not data:
        raise ImageLoadError("empty file")
    return _decode(io.BytesIO(data))
