"""The real CLIP BPE tokenizer, built offline.

The CLIP vocabulary is fully determined by the BPE merge table (the byte alphabet, its ``</w>`` forms, one token
per merge, then the two special tokens), and open_clip's wheel carries that table. So the exact tokenizer that
``openai/clip-vit-large-patch14`` ships can be rebuilt here without any hub access.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

# transformers is imported where a tokenizer is built: cache_root() serves the scripts before their flags are checked.

VOCAB_SIZE = 49408
NUM_MERGES = VOCAB_SIZE - 256 * 2 - 2  # 48,894
BOS_ID = 49406
EOS_ID = 49407


def cache_root() -> Path:
    """Where Embedforge keeps things it builds once (tokenizers, tiny models)."""
    root = os.environ.get("EMBEDFORGE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "embedforge"
    )
    return Path(root)


def _bpe_table_path() -> Path:
    spec = importlib.util.find_spec("open_clip")  # locate the wheel without importing it (it needs torchvision)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "The CLIP BPE table comes from the open_clip_torch package; install it with "
            "`pip install --no-deps -r requirements-nodeps.txt`."
        )
    path = Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise RuntimeError(f"open_clip_torch is installed but {path} is missing.")
    return path


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP byte-level alphabet: printable bytes map to themselves, the rest to code points above 255.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def _write_vocab_files(out_dir: Path) -> tuple[Path, Path]:
    lines = gzip.open(_bpe_table_path(), "rt", encoding="utf-8").read().split("\n")
    merges = lines[1 : NUM_MERGES + 1]
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    assert len(tokens) == VOCAB_SIZE, len(tokens)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_file, merges_file = out_dir / "vocab.json", out_dir / "merges.txt"
    tmp = out_dir / f".vocab.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    os.replace(tmp, vocab_file)
    tmp = out_dir / f".merges.{os.getpid()}.tmp"
    tmp.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    os.replace(tmp, merges_file)
    return vocab_file, merges_file


@lru_cache(maxsize=None)
def _vocab_files() -> tuple[str, str]:
    out_dir = cache_root() / "clip-bpe"
    vocab_file, merges_file = out_dir / "vocab.json", out_dir / "merges.txt"
    if not (vocab_file.is_file() and merges_file.is_file()):
        vocab_file, merges_file = _write_vocab_files(out_dir)
    return str(vocab_file), str(merges_file)


def build_clip_tokenizer(open_clip_padding: bool = False) -> CLIPTokenizer:
    """The CLIP tokenizer of SD-1.x (pads with EOS), or of SD-2.x / SDXL's second encoder (pads with id 0, ``!``)."""
    from transformers import CLIPTokenizer

    vocab_file, merges_file = _vocab_files()
    return CLIPTokenizer(
        vocab=vocab_file,
        merges=merges_file,
        pad_token="!" if open_clip_padding else "<|endoftext|>",
        model_max_length=77,
    )


def load_tokenizer(name_or_path: str) -> CLIPTokenizer:
    """``--tokenizer_name`` (diffusers' flag): a tokenizer folder, a diffusers model folder (its ``tokenizer/``) or a
    Hub id. A config that does not say the CLIP context length gets 77 (transformers would pad to 1e30)."""
    from transformers import CLIPTokenizer

    from utils.errors import UserError

    path = Path(os.path.expanduser(name_or_path))
    where = path / "tokenizer" if (path / "tokenizer").is_dir() else path if path.exists() else name_or_path
    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(where))
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"--tokenizer_name {name_or_path}: cannot load a CLIP tokenizer "
                        f"({' '.join(str(e).split())[:200]})") from None
    if tokenizer.model_max_length > 10_000:
        tokenizer.model_max_length = 77
    return tokenizer
