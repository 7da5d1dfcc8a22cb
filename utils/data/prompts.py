"""Captions and prompts: A1111's caption from a file name, .txt side-cars, template files, tag shuffle/dropout."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from utils.data.config import PromptConfig
from utils.errors import UserError

TEMPLATES_DIR = Path(__file__).resolve().parent.parent.parent / "templates"

_LEADING_NUMBERS = re.compile(r"^[-\d]+\s*")


def caption_from_filename(stem: str, word_regex: str = "", join_string: str = " ") -> str:
    """A1111's caption for an image without a .txt: drop a leading run of digits and dashes (and the spaces after
    it), then, if ``word_regex`` is given, join all its matches with ``join_string``."""
    text = _LEADING_NUMBERS.sub("", stem)
    if word_regex:
        text = join_string.join(re.findall(word_regex, text))
    return text


def read_caption_file(path: str | os.PathLike) -> str:
    """The caption text of a .txt side-car (UTF-8, BOM tolerated, surrounding whitespace removed). Raises ValueError
    with a reason when the file is not UTF-8 or cannot be read."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"caption file unreadable ({e.strerror or e})") from None
    try:
        return data.decode("utf-8-sig").strip()
    except UnicodeDecodeError:
        raise ValueError("caption file is not UTF-8") from None


def resolve_template(cfg: PromptConfig, has_captions: bool) -> Path | None:
    """The template file to use, or None in caption-only mode.

    Without ``template_file``: ``learnable_property`` object -> subject, style -> style, with the ``_filewords`` variant
    when the dataset has real captions (a .txt beside any image, a caption column, or a --filename_word_regex, which
    says the file names are meaningful). Plain file names like IMG_0001 are not treated as captions."""
    if cfg.caption_only:
        return None
    name = cfg.template_file
    if name is None:
        base = "subject" if cfg.learnable_property == "object" else "style"
        name = base + ("_filewords" if has_captions else "")
    p = Path(name)
    if p.is_file():
        return p
    for cand in (TEMPLATES_DIR / name, TEMPLATES_DIR / f"{name}.txt"):
        if cand.is_file():
            return cand
    known = ", ".join(sorted(f.stem for f in TEMPLATES_DIR.glob("*.txt")))
    raise UserError(f"template file {name!r} not found (not a file, nor one of templates/: {known})")


def load_template(path: str | os.PathLike) -> list[str]:
    """Template lines, stripped; blank lines are dropped (A1111 keeps them and can draw an empty prompt)."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read template file {path}: {e}") from None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise UserError(f"template file {path} has no prompt lines")
    return lines


def process_tags(caption: str, shuffle: bool, dropout: float, rng: np.random.Generator) -> str:
    """Split on ',', trim, drop each tag with probability ``dropout``, shuffle if asked, join with ', '.

    A1111 neither trims nor adds spaces (joins with ','); trimming keeps shuffled tags tidy and tokenizes the same."""
    if not shuffle and dropout <= 0:
        return caption
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    if dropout > 0:
        tags = [t for t in tags if rng.random() >= dropout]
    if shuffle and len(tags) > 1:
        tags = [tags[i] for i in rng.permutation(len(tags))]
    return ", ".join(tags)


def build_prompt(caption: str, lines: list[str] | None, cfg: PromptConfig, rng: np.random.Generator) -> str:
    """One use's prompt: a template line drawn from ``lines`` (A1111 fixes one line per image unless tags are shuffled
    or dropped; we draw per use), [filewords] -> processed caption, then [name] -> placeholder."""
    words = process_tags(caption or "", cfg.shuffle_tags, cfg.tag_dropout, rng)
    text = "[filewords]" if lines is None else lines[int(rng.integers(len(lines)))]
    return text.replace("[filewords]", words).replace("[name]", cfg.placeholder)

