"""Opening user images safely and turning every PIL mode into RGB (plus an optional alpha mask)."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".jxl", ".avif"}

# Pixels above this are refused before decoding (a "decompression bomb" would otherwise exhaust memory).
MAX_IMAGE_PIXELS = 16384 * 16384


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
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                if w * h > MAX_IMAGE_PIXELS:
                    raise ImageLoadError(f"image too large ({w}x{h} pixels; limit {MAX_IMAGE_PIXELS})")
                img.load()
                return to_rgb_and_alpha(img)
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageLoadError(f"image too large ({e})") from None
    except Image.UnidentifiedImageError:
        raise ImageLoadError("not an image") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageLoadError(f"corrupt or truncated image ({e})") from None
