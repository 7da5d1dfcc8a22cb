"""Turning one picture into training-sized pictures, as A1111's "Preprocess images" tab did
(docs/a1111-rules.md, "Preprocessing").

Every operation takes and returns PIL images; nothing here touches files. `make_outputs` is the recipe for one
source picture: split / focal crop / auto-sized crop / keep original, else the default crop-and-resize, then flips.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageOps

FLIP_MODES = ("horizontal", "vertical", "both")
AUTOSIZE_OBJECTIVES = ("max_area", "min_error")


@dataclass
class SplitConfig:
    # split only pictures whose aspect ratio is this far off the target (docs/a1111-rules.md, "Preprocessing")
    threshold: float = 0.5
    overlap: float = 0.2  # fraction of a tile shared with its neighbour

    def __post_init__(self) -> None:
        # Same clamps as the A1111 sliders.
        self.threshold = min(max(self.threshold, 0.0), 1.0)
        self.overlap = min(max(self.overlap, 0.0), 0.9)


@dataclass
class FocalConfig:
    face_weight: float = 0.9
    entropy_weight: float = 0.15
    edges_weight: float = 0.5
    face_model: str | None = None  # YuNet .onnx; None = OpenCV's bundled Haar cascades (when this OpenCV ships them)
    debug: bool = False


@dataclass
class AutosizeConfig:
    min_dim: int = 384
    max_dim: int = 768
    min_area: int = 64 * 64
    max_area: int = 640 * 640
    objective: str = "max_area"  # or "min_error"
    threshold: float = 0.1  # largest accepted aspect error


@dataclass
class CropConfig:
    width: int = 512
    height: int = 512
    split: SplitConfig | None = None
    focal: FocalConfig | None = None
    autosize: AutosizeConfig | None = None
    keep_original_size: bool = False
    flips: tuple[str, ...] = ()


@dataclass
class CropResult:
    images: list[Image.Image]  # the training pictures, flipped copies right after the picture they mirror
    debug_images: list[Image.Image] = field(default_factory=list)  # focal-point debug pictures (not training data)
    notes: list[str] = field(default_factory=list)  # why an enabled operation produced nothing


# ---------------------------------------------------------------------------------------------------- resize / flip


def crop_and_resize(img: Image.Image, width: int, height: int) -> Image.Image:
    """A1111's default "crop and resize": scale to cover width x height, keep the centre."""
    return ImageOps.fit(img, (width, height), Image.Resampling.LANCZOS)


def flipped_copies(img: Image.Image, modes: tuple[str, ...] | list[str]) -> list[Image.Image]:
    """One extra picture per mode; "both" is mirrored on both axes (A1111's Extras "Both")."""
    out = []
    for mode in modes:
        if mode == "horizontal":
            out.append(ImageOps.mirror(img))
        elif mode == "vertical":
            out.append(ImageOps.flip(img))
        elif mode == "both":
            out.append(img.transpose(Image.Transpose.ROTATE_180))
        else:
            raise ValueError(f"unknown flip mode {mode!r}; expected one of {FLIP_MODES}")
    return out


# ---------------------------------------------------------------------------------------------------- split


def split_ratio(img_w: int, img_h: int, width: int, height: int) -> float:
    """How much more elongated the picture is than the target along its long side (< 1: more elongated)."""
    if img_h > img_w:
        return (img_w * height) / (img_h * width)
    return (img_h * width) / (img_w * height)


def should_split(img_w: int, img_h: int, width: int, height: int, threshold: float) -> bool:
    ratio = split_ratio(img_w, img_h, width, height)
    return ratio < 1 and ratio <= threshold


def tile_offsets(length: int, tile: int, overlap: float) -> list[int]:
    """Start offsets of tiles along `length`: first at 0, last flush with the end, evenly spread (A1111's rule)."""
    count = math.ceil((length - tile * overlap) / (tile * (1 - overlap)))
    if count <= 1:
        return [0]
    return [int(i * (length - tile) / (count - 1)) for i in range(count)]


def split_oversized(img: Image.Image, width: int, height: int, overlap: float) -> list[Image.Image]:
    """Scale the short side to the target, then cut overlapping width x height tiles along the long side."""
    w, h = img.size
    if h > w:
        long_len = h * width // w
        scaled = img.resize((width, long_len), Image.Resampling.LANCZOS)
        return [scaled.crop((0, y, width, y + height)) for y in tile_offsets(long_len, height, overlap)]
    long_len = w * height // h
    scaled = img.resize((long_len, height), Image.Resampling.LANCZOS)
    return [scaled.crop((x, 0, x + width, height)) for x in tile_offsets(long_len, width, overlap)]


# ---------------------------------------------------------------------------------------------------- auto-sized


def aspect_error(img_w: int, img_h: int, w: int, h: int) -> float:
    r = (img_w / img_h) / (w / h)
    return 1 - min(r, 1 / r)


def autosized_size(img_w: int, img_h: int, cfg: AutosizeConfig) -> tuple[int, int] | None:
    """The (w, h) on a 64-px grid within the limits that best fits the picture, or None when none is close enough."""
    dims = range(cfg.min_dim, cfg.max_dim + 1, 64)
    candidates = [
        (w, h)
        for w in dims
        for h in dims
        if cfg.min_area <= w * h <= cfg.max_area and aspect_error(img_w, img_h, w, h) <= cfg.threshold
    ]
    if not candidates:
        return None
    if cfg.objective == "max_area":
        return max(candidates, key=lambda s: (s[0] * s[1], -aspect_error(img_w, img_h, *s)))
    if cfg.objective == "min_error":
        return max(candidates, key=lambda s: (-aspect_error(img_w, img_h, *s), s[0] * s[1]))
    raise ValueError(f"unknown objective {cfg.objective!r}; expected one of {AUTOSIZE_OBJECTIVES}")


def autosized_crop(img: Image.Image, cfg: AutosizeConfig) -> Image.Image | None:
    size = autosized_size(img.width, img.height, cfg)
    return None if size is None else ImageOps.fit(img, size, Image.Resampling.LANCZOS)


# ---------------------------------------------------------------------------------------------------- focal point


@dataclass
class FocalCrop:
    image: Image.Image
    focal: tuple[int, int]  # in the scaled picture's pixels
    box: tuple[int, int, int, int]  # crop box (left, top, right, bottom) in the scaled picture
    centroids: dict[str, tuple[float, float]]  # per point-of-interest kind that found something
    debug: Image.Image | None = None


def _cover_size(img_w: int, img_h: int, crop_w: int, crop_h: int) -> tuple[int, int]:
    # Equals A1111's per-orientation rule wherever that rule covers the crop; where it would not (a landscape picture
    # cropped to an even wider box), A1111 left black borders, so cover instead.
    s = max(crop_w / img_w, crop_h / img_h)
    return max(crop_w, int(img_w * s + 1e-6)), max(crop_h, int(img_h * s + 1e-6))


def corner_points(img: Image.Image) -> list[tuple[float, float]]:
    import cv2

    gray = np.array(img.convert("L"))
    h, w = gray.shape
    gray[int(h * 0.9) :, :] = 0x99  # hide the bottom strip where watermarks and signatures live
    pts = cv2.goodFeaturesToTrack(gray, maxCorners=100, qualityLevel=0.04, minDistance=max(1.0, min(w, h) * 0.06))
    if pts is None:
        return []
    return [(float(x), float(y)) for x, y in pts.reshape(-1, 2)]


def _binary_entropy(p: np.ndarray) -> np.ndarray:
    q = np.clip(p, 1e-12, 1 - 1e-12)
    e = -(q * np.log2(q) + (1 - q) * np.log2(1 - q))
    return np.where((p <= 0) | (p >= 1), 0.0, e)


def entropy_point(img: Image.Image, crop_w: int, crop_h: int, step: int = 4) -> tuple[float, float]:
    """Centre of the crop-sized window, slid along the long axis in `step` px, whose 1-bit picture has most entropy.

    Uses prefix sums over one 1-bit conversion of the whole picture instead of converting every window.
    """
    bits = np.asarray(img.convert("1"), dtype=np.float64)
    h, w = bits.shape
    slack_x, slack_y = w - crop_w, h - crop_h
    if slack_x <= 0 and slack_y <= 0:
        return (w / 2, h / 2)
    along_x = slack_x >= slack_y
    ones = bits.sum(axis=0) if along_x else bits.sum(axis=1)
    span, slack = (crop_w, slack_x) if along_x else (crop_h, slack_y)
    prefix = np.concatenate([[0.0], np.cumsum(ones)])
    offsets = np.arange(0, slack + 1, step)
    area = span * (h if along_x else w)
    scores = _binary_entropy((prefix[offsets + span] - prefix[offsets]) / area)
    best = int(offsets[int(np.argmax(scores))])
    if along_x:
        return (best + crop_w / 2, h / 2)
    return (w / 2, best + crop_h / 2)


HAAR_CASCADES = (  # (file, min size as a fraction of the short side); the first that finds anything wins
    ("haarcascade_eye.xml", 0.01),
    ("haarcascade_frontalface_default.xml", 0.05),
    ("haarcascade_profileface.xml", 0.05),
    ("haarcascade_frontalface_alt.xml", 0.05),
    ("haarcascade_frontalface_alt2.xml", 0.05),
    ("haarcascade_frontalface_alt_tree.xml", 0.05),
    ("haarcascade_eye_tree_eyeglasses.xml", 0.05),
    ("haarcascade_upperbody.xml", 0.05),
)


def haar_cascades_available() -> bool:
    """OpenCV 5 dropped CascadeClassifier and its bundled XML files; 4.x has both."""
    import cv2

    folder = getattr(getattr(cv2, "data", None), "haarcascades", None)
    return (
        hasattr(cv2, "CascadeClassifier")
        and folder is not None
        and os.path.isfile(os.path.join(folder, HAAR_CASCADES[1][0]))
    )


@lru_cache(maxsize=None)
def _haar(name: str):
    import cv2

    return cv2.CascadeClassifier(os.path.join(cv2.data.haarcascades, name))


def haar_face_points(img: Image.Image) -> list[tuple[float, float]]:
    if not haar_cascades_available():
        return []
    gray = np.array(img.convert("L"))
    short = min(gray.shape)
    for name, min_frac in HAAR_CASCADES:
        size = max(1, int(short * min_frac))
        boxes = _haar(name).detectMultiScale(gray, scaleFactor=1.1, minNeighbors=7, minSize=(size, size))
        if len(boxes):
            return [(float(x + w / 2), float(y + h / 2)) for x, y, w, h in boxes]
    return []


@lru_cache(maxsize=4)
def _yunet(model_path: str):
    import cv2

    return cv2.FaceDetectorYN.create(model_path, "", (320, 320), score_threshold=0.9, nms_threshold=0.3, top_k=5000)


def yunet_face_points(img: Image.Image, model_path: str) -> list[tuple[float, float]]:
    bgr = np.ascontiguousarray(np.array(img.convert("RGB"))[:, :, ::-1])
    detector = _yunet(model_path)
    detector.setInputSize((bgr.shape[1], bgr.shape[0]))
    _, faces = detector.detect(bgr)
    if faces is None:
        return []
    # A bit above the box centre: eyes matter more than chins.
    return [(float(f[0] + f[2] * 0.5), float(f[1] + f[3] * 0.33)) for f in faces]


def face_points(img: Image.Image, face_model: str | None) -> list[tuple[float, float]]:
    return yunet_face_points(img, face_model) if face_model else haar_face_points(img)


def _centroid(points: list[tuple[float, float]]) -> tuple[float, float]:
    xs, ys = zip(*points)
    return (sum(xs) / len(xs), sum(ys) / len(ys))


def focal_point(
    img: Image.Image, crop_w: int, crop_h: int, cfg: FocalConfig, faces=face_points
) -> tuple[tuple[int, int], dict[str, tuple[float, float]]]:
    """Weighted average of the centroids of each kind of point of interest; the picture centre when none is found.

    `faces(img, face_model)` returns face points; a parameter so tests can plant faces.
    """
    finders = {
        "faces": (cfg.face_weight, lambda: faces(img, cfg.face_model)),
        "entropy": (cfg.entropy_weight, lambda: [entropy_point(img, crop_w, crop_h)]),
        "edges": (cfg.edges_weight, lambda: corner_points(img)),
    }
    centroids, weights = {}, {}
    for kind, (weight, find) in finders.items():
        if weight > 0:
            points = find()
            if points:
                centroids[kind], weights[kind] = _centroid(points), weight
    total = sum(weights.values())
    if total <= 0:
        return (img.width // 2, img.height // 2), centroids
    x = sum(centroids[k][0] * weights[k] for k in centroids) / total
    y = sum(centroids[k][1] * weights[k] for k in centroids) / total
    return (round(x), round(y)), centroids


def _debug_picture(img: Image.Image, focal, box, centroids) -> Image.Image:
    out = img.convert("RGB")
    draw = ImageDraw.Draw(out)
    draw.rectangle(box, outline=(255, 0, 0), width=3)
    colours = {"faces": (255, 128, 0), "entropy": (0, 128, 255), "edges": (0, 220, 0)}
    r = max(4, min(img.size) // 40)
    for kind, (x, y) in centroids.items():
        draw.ellipse((x - r, y - r, x + r, y + r), outline=colours[kind], width=3)
        draw.text((x + r + 2, y - r), kind, fill=colours[kind])
    fx, fy = focal
    draw.line((fx - 2 * r, fy, fx + 2 * r, fy), fill=(255, 0, 0), width=3)
    draw.line((fx, fy - 2 * r, fx, fy + 2 * r), fill=(255, 0, 0), width=3)
    return out


def focal_crop(img: Image.Image, crop_w: int, crop_h: int, cfg: FocalConfig, faces=face_points) -> FocalCrop:
    """Scale to cover the crop, find the focal point, and cut the crop centred on it (shifted back inside)."""
    scaled = img.resize(_cover_size(img.width, img.height, crop_w, crop_h), Image.Resampling.BICUBIC)
    focal, centroids = focal_point(scaled, crop_w, crop_h, cfg, faces=faces)
    left = min(max(focal[0] - crop_w // 2, 0), scaled.width - crop_w)
    top = min(max(focal[1] - crop_h // 2, 0), scaled.height - crop_h)
    box = (left, top, left + crop_w, top + crop_h)
    debug = _debug_picture(scaled, focal, box, centroids) if cfg.debug else None
    return FocalCrop(scaled.crop(box), focal, box, centroids, debug)


# ---------------------------------------------------------------------------------------------------- the recipe


def make_outputs(img: Image.Image, cfg: CropConfig) -> CropResult:
    """All training pictures for one source picture, in A1111's order (docs/a1111-rules.md, "Preprocessing")."""
    pictures: list[Image.Image] = []
    result = CropResult(images=[])
    applied = False
    w, h = img.size
    if cfg.split is not None and should_split(w, h, cfg.width, cfg.height, cfg.split.threshold):
        pictures += split_oversized(img, cfg.width, cfg.height, cfg.split.overlap)
        applied = True
    if cfg.focal is not None and w != h:
        fc = focal_crop(img, cfg.width, cfg.height, cfg.focal)
        pictures.append(fc.image)
        if fc.debug is not None:
            result.debug_images.append(fc.debug)
        applied = True
    if cfg.autosize is not None:
        cropped = autosized_crop(img, cfg.autosize)
        if cropped is None:
            result.notes.append("no auto-sized crop fits the size limits and error threshold")
        else:
            pictures.append(cropped)
        applied = True
    if cfg.keep_original_size:
        pictures.append(img)
        applied = True
    if not applied:
        pictures.append(crop_and_resize(img, cfg.width, cfg.height))
    for picture in pictures:
        result.images.append(picture)
        result.images += flipped_copies(picture, cfg.flips)
    return result
