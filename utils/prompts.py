"""Embeddings used by name in prompts, as A1111 does it (docs/a1111-rules.md, "Embeddings in prompts").

Four parts:

* :class:`EmbeddingDatabase` — every embedding file under some folders, re-checked before each generation so files
  added, replaced in place or removed are picked up without a restart; sorted into ``loaded`` and ``skipped`` (wrong
  width for the model) plus ``errors`` for files that are not embeddings. A re-check lists the folders and reads each
  file's stat; only new or changed files are opened (files that failed are remembered too).
* :func:`parse_emphasis` and :class:`PromptChunker` — a prompt becomes chunks of 75 tokens, each wrapped in BOS/EOS.
  An embedding name is matched as a token-id sequence (longest first) and replaced by as many placeholder slots as it
  has vectors; an embedding never straddles two chunks; ``BREAK`` starts a new chunk; a chunk that fills up moves the
  words after its last comma (if within 20 tokens) to the next one.
* :class:`PromptTokenizer` — prompts -> token ids per text encoder, each embedding's slots as negative ids that
  utils/text_encoders.py reads as rows of a vector table. Training, previews and inference all tokenize here.
* :class:`PromptEncoder` — prompt text -> conditioning for inference and previews: ``[B, 77·k, C]`` (plus the
  pooled output for SDXL), the named embeddings' vectors spliced in by utils.text_encoders.TextEncoders.encode.

The vocabulary, the tokenizer and the weights are never changed.
"""

from __future__ import annotations

import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from utils.embeddings import Embedding
from utils.errors import UserError
from utils.text_encoders import WINDOW, Conditioning, TextEncoders, apply_emphasis  # noqa: F401  (apply_emphasis: API)

CHUNK_LENGTH = 75
COMMA_BACKTRACK = 20
EMPHASIS_UP = 1.1
BREAK_WEIGHT = -1.0  # marks a BREAK segment in parse_emphasis' output


# ---------------------------------------------------------------------------------------------------------------
# Embedding database
# ---------------------------------------------------------------------------------------------------------------

def _file_stamp(path: Path) -> tuple[int, int, int, int] | None:
    """What tells us a file changed: size, mtime and ctime (ns), inode.

    ctime moves on every write and cannot be set back by ``os.utime``, so a file rewritten in place within the same
    second, or with its mtime restored, is still noticed.
    """
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


@dataclass
class _FileEntry:
    stamp: tuple
    embedding: Embedding | None
    error: str | None


class EmbeddingDatabase:
    """All embedding files under ``dirs`` (recursive), kept current by :meth:`refresh`.

    After a refresh: ``loaded`` {name: Embedding} usable with the current model, ``skipped`` {name: reason} and
    ``skipped_embeddings`` {name: Embedding} for those of the wrong width, ``errors`` {path: message} for files that
    could not be read as embeddings. If several files give the same name, utils.embeddings.prefer_files picks the one
    used (the A1111 .pt first; among equals the later one in walk order) and ``duplicates`` {name: [used, others]}
    lists them. ``version`` increases whenever any of that changed.
    """

    def __init__(self, dirs: list[str | os.PathLike] | None = None):
        self.dirs = [Path(d) for d in (dirs or [])]
        self.loaded: dict[str, Embedding] = {}
        self.skipped: dict[str, str] = {}
        self.skipped_embeddings: dict[str, Embedding] = {}
        self.errors: dict[str, str] = {}
        self.duplicates: dict[str, list[str]] = {}
        self.version = 0
        self._files: dict[str, _FileEntry] = {}
        self._registered: dict[str, Embedding] = {}
        self._state: tuple | None = None
        self._reported: set[tuple[str, tuple]] = set()

    def register(self, embedding: Embedding) -> None:
        """Add an in-memory embedding (e.g. the one being trained, for previews); it wins over files of that name."""
        self._registered[embedding.name] = embedding
        self._state = None

    def _scan(self) -> list[tuple[str, tuple]]:
        found = []
        for folder in self.dirs:
            if not folder.is_dir():
                continue
            from utils.embeddings import list_embedding_files

            for path in list_embedding_files(folder, recursive=True):
                stamp = _file_stamp(Path(path))
                if stamp is not None:  # vanished between listing and stat
                    found.append((str(path), stamp))
        return found

    @staticmethod
    def _load(path: str, stamp: tuple) -> _FileEntry:
        from utils.embeddings import load_embedding

        try:
            return _FileEntry(stamp, load_embedding(path), None)
        except UserError as e:
            return _FileEntry(stamp, None, " ".join(str(e).split()))
        except Exception as e:  # one unreadable file must not stop the others from loading
            return _FileEntry(stamp, None, f"{type(e).__name__}: {e}")

    def refresh(self, expected_width: int | None = None) -> bool:
        """Re-read what changed on disk; sort into loaded/skipped for ``expected_width``. True if anything changed."""
        files = self._scan()
        state = (tuple(files), expected_width, tuple((k, id(v)) for k, v in self._registered.items()))
        if state == self._state:
            return False
        entries = {}
        for path, stamp in files:
            old = self._files.get(path)
            entries[path] = old if old is not None and old.stamp == stamp else self._load(path, stamp)
        self._files = entries
        self._rebuild(expected_width)
        self._state = state
        self.version += 1
        return True

    def new_errors(self) -> list[str]:
        """One line per file in ``errors`` not reported by an earlier call (again only once the file changes)."""
        out = []
        for path, message in self.errors.items():
            key = (path, self._files[path].stamp)
            if key not in self._reported:
                self._reported.add(key)
                out.append(message if message.startswith(path) else f"{path}: {message}")
        return out

    def _rebuild(self, expected_width: int | None) -> None:
        loaded: dict[str, Embedding] = {}
        skipped: dict[str, Embedding] = {}
        reasons: dict[str, str] = {}
        errors: dict[str, str] = {}
        candidates = []
        for path, entry in self._files.items():
            if entry.error is not None:
                errors[path] = entry.error
            elif entry.embedding is not None:  # None: a file that is silently not an embedding (e.g. *.preview.png)
                candidates.append(entry.embedding)
        from utils.embeddings import prefer_files

        candidates, self.duplicates = prefer_files(candidates)
        candidates += list(self._registered.values())
        for emb in candidates:
            loaded.pop(emb.name, None)
            skipped.pop(emb.name, None)
            reasons.pop(emb.name, None)
            reason = skip_reason(emb, expected_width)
            if reason is None:
                loaded[emb.name] = emb
            else:
                skipped[emb.name] = emb
                reasons[emb.name] = reason
        order = lambda d: dict(sorted(d.items(), key=lambda kv: kv[0].casefold()))  # noqa: E731  (A1111 sorts so)
        self.loaded, self.skipped_embeddings, self.skipped, self.errors = order(loaded), order(skipped), order(reasons), errors


def warn_refused_files(db: EmbeddingDatabase, prog: str) -> None:
    """One warning on stderr per file ``db`` could not load and has not reported yet: without it, the file's name in
    a prompt would silently be read as plain words."""
    for message in db.new_errors():
        print(f"{prog}: warning: {message}; its name is used as plain words", file=sys.stderr)


def skip_reason(emb: Embedding, expected_width: int | None) -> str | None:
    """Why ``emb`` cannot be used with a model whose text width is ``expected_width`` (None = usable)."""
    if expected_width is None or emb.width == expected_width:
        return None
    kind = "SDXL (clip_l + clip_g)" if emb.is_sdxl else f"{emb.width}-wide"
    return f"{kind} embedding does not fit this model's text width {expected_width}"


# ---------------------------------------------------------------------------------------------------------------
# Prompt text -> weighted segments
# ---------------------------------------------------------------------------------------------------------------

_EMPHASIS_TOKEN = re.compile(
    r"\\[\\()\[\]]"  # escaped bracket or backslash
    r"|\\"  # lone backslash
    r"|\(|\["
    r"|:\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*\)"  # ":1.2)" closes a weighted group
    r"|\)|\]"
    r"|[^\\()\[\]:]+"
    r"|:"
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


def parse_emphasis(text: str) -> list[tuple[str, float]]:
    """A1111's attention syntax: ``(x)`` ×1.1, ``[x]`` ÷1.1, ``(x:w)`` ×w, ``\\(`` literal, ``BREAK`` = new chunk.

    Returns (text, weight) segments; a BREAK is the segment ("BREAK", -1). Unclosed brackets close at the end.
    """
    out: list[list] = []
    open_round: list[int] = []
    open_square: list[int] = []

    def scale(start: int, factor: float) -> None:
        for k in range(start, len(out)):
            out[k][1] *= factor

    for m in _EMPHASIS_TOKEN.finditer(text):
        tok, weight = m.group(0), m.group(1)
        if tok.startswith("\\") and len(tok) == 2:
            out.append([tok[1], 1.0])
        elif tok == "(":
            open_round.append(len(out))
        elif tok == "[":
            open_square.append(len(out))
        elif weight is not None and open_round:
            scale(open_round.pop(), float(weight))
        elif tok == ")" and open_round:
            scale(open_round.pop(), EMPHASIS_UP)
        elif tok == "]" and open_square:
            scale(open_square.pop(), 1 / EMPHASIS_UP)
        else:
            for i, part in enumerate(_BREAK.split(tok)):
                if i > 0:
                    out.append(["BREAK", BREAK_WEIGHT])
                out.append([part, 1.0])
    for start in open_round:
        scale(start, EMPHASIS_UP)
    for start in open_square:
        scale(start, 1 / EMPHASIS_UP)

    merged: list[list] = []
    for seg in out:
        if seg[1] == BREAK_WEIGHT:
            merged.append(seg)
        elif seg[0] == "":
            continue
        elif merged and merged[-1][1] == seg[1] and merged[-1][1] != BREAK_WEIGHT:
            merged[-1][0] += seg[0]
        else:
            merged.append(list(seg))
    return [(t, w) for t, w in merged] or [("", 1.0)]


# ---------------------------------------------------------------------------------------------------------------
# Segments -> 77-token chunks
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class Chunk:
    """One text-encoder window: 77 ids (BOS + 75 + EOS), a weight per id, and the embeddings to write in.

    ``fixes`` holds (offset, embedding): the embedding's rows go to positions offset+1 … offset+n (+1 skips BOS).
    """

    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    fixes: list[tuple[int, Embedding]] = field(default_factory=list)


@dataclass
class TokenizedPrompt:
    chunks: list[Chunk]
    token_count: int  # tokens the prompt uses (embedding vectors count one each)
    embeddings: dict[str, Embedding]

    @property
    def token_limit(self) -> int:
        """What A1111 shows as the limit: the token count rounded up to a multiple of 75."""
        return max(1, math.ceil(self.token_count / CHUNK_LENGTH)) * CHUNK_LENGTH


class EmbeddingLookup:
    """Embedding names as token-id sequences of one tokenizer: first id -> [(ids, embedding)], longest first."""

    def __init__(self, tokenizer, embeddings: dict[str, Embedding]):
        self.table: dict[int, list[tuple[list[int], Embedding]]] = {}
        keys = [(name, emb) for name, emb in embeddings.items()]
        # A diffusers concept file also answers to its own token (learned_embeds.bin -> "<birb-style>"), which is
        # what its users type; the file-stem name (A1111's rule) stays the main one and wins on equal ids.
        keys += [(emb.extra["token"], emb) for emb in embeddings.values()
                 if isinstance(emb.extra.get("token"), str) and emb.extra["token"] not in embeddings]
        ids_per_key = _tokenize(tokenizer, [k for k, _ in keys]) if keys else []
        seen: set[tuple[int, ...]] = set()
        for (_, emb), ids in zip(keys, ids_per_key):
            for variant in (ids, _punctuation_followed(tokenizer, ids)):
                if variant and tuple(variant) not in seen:
                    seen.add(tuple(variant))
                    self.table.setdefault(variant[0], []).append((variant, emb))
        for entries in self.table.values():
            entries.sort(key=lambda e: len(e[0]), reverse=True)

    def match(self, tokens: list[int], pos: int) -> tuple[Embedding, int] | None:
        for ids, emb in self.table.get(tokens[pos], ()):
            if tokens[pos : pos + len(ids)] == ids:
                return emb, len(ids)
        return None


def _punctuation_followed(tokenizer, ids: list[int]) -> list[int] | None:
    """The ids of a name ending in punctuation when more punctuation follows it ("<birb-style>,").

    CLIP's pre-tokenizer keeps a run of punctuation together, so the final ``></w>`` of the name becomes a
    mid-word ``>`` before a comma and a plain token-sequence match would miss it. Names ending in a letter or digit
    never change this way, so this only widens matching for names that end in punctuation.
    """
    if not ids:
        return None
    last = tokenizer.convert_ids_to_tokens(ids[-1])
    if not last.endswith("</w>") or any(c.isalnum() for c in last[:-4]):
        return None
    inner = tokenizer.convert_tokens_to_ids(last[:-4])
    if inner is None or inner == tokenizer.unk_token_id:
        return None
    return ids[:-1] + [inner]


def _tokenize(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]


class PromptChunker:
    """Turns prompts into :class:`Chunk` lists for one tokenizer (A1111's tokenize_line)."""

    def __init__(self, tokenizer, lookup: EmbeddingLookup, comma_backtrack: int = COMMA_BACKTRACK):
        self.tokenizer = tokenizer
        self.lookup = lookup
        self.comma_backtrack = comma_backtrack
        self.bos = tokenizer.bos_token_id
        self.eos = tokenizer.eos_token_id
        # SD-1's tokenizer pads with EOS; OpenCLIP (SD-2, SDXL's second encoder) with id 0 after the first EOS.
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos
        self.comma = tokenizer.convert_tokens_to_ids(",</w>")

    def _close(self, chunk: Chunk) -> Chunk:
        fill = CHUNK_LENGTH - len(chunk.tokens)
        ids = [self.bos] + chunk.tokens + [self.eos] * (fill + 1)
        if self.pad != self.eos:
            first_eos = len(chunk.tokens) + 1
            ids = ids[: first_eos + 1] + [self.pad] * (len(ids) - first_eos - 1)
        return Chunk(ids, [1.0] + chunk.weights + [1.0] * (fill + 1), chunk.fixes)

    def empty_chunk(self) -> Chunk:
        return self._close(Chunk())

    def __call__(self, prompt: str) -> TokenizedPrompt:
        segments = parse_emphasis(prompt)
        texts = [t for t, w in segments if w != BREAK_WEIGHT]
        token_lists = iter(_tokenize(self.tokenizer, texts)) if texts else iter(())
        chunks: list[Chunk] = []
        used: dict[str, Embedding] = {}
        cur = Chunk()
        count = 0
        last_comma = -1

        def flush(is_last: bool = False) -> None:
            nonlocal cur, count, last_comma
            count += len(cur.tokens) if is_last else CHUNK_LENGTH
            chunks.append(self._close(cur))
            cur, last_comma = Chunk(), -1

        for text, weight in segments:
            if weight == BREAK_WEIGHT:
                flush()
                continue
            tokens = next(token_lists)
            pos = 0
            while pos < len(tokens):
                tok = tokens[pos]
                hit = self.lookup.match(tokens, pos)
                if tok == self.comma:
                    last_comma = len(cur.tokens)
                elif (self.comma_backtrack and len(cur.tokens) == CHUNK_LENGTH and last_comma != -1
                      and len(cur.tokens) - last_comma <= self.comma_backtrack):
                    cur = self._backtrack(cur, last_comma + 1, flush)
                if len(cur.tokens) == CHUNK_LENGTH:
                    flush()
                if hit is None:
                    cur.tokens.append(tok)
                    cur.weights.append(weight)
                    pos += 1
                    continue
                emb, n_ids = hit
                n = emb.num_vectors
                if n > CHUNK_LENGTH:
                    raise UserError(f"embedding {emb.name!r} has {n} vectors; at most {CHUNK_LENGTH} fit in a prompt")
                if len(cur.tokens) + n > CHUNK_LENGTH:
                    flush()  # embeddings are never split across chunks
                cur.fixes.append((len(cur.tokens), emb))
                cur.tokens += [0] * n
                cur.weights += [weight] * n
                used[emb.name] = emb
                pos += n_ids
        if cur.tokens or not chunks:
            flush(is_last=True)
        return TokenizedPrompt(chunks, count, used)

    @staticmethod
    def _backtrack(cur: Chunk, split_at: int, flush) -> Chunk:
        """Close ``cur`` after its last comma; the words after it (and any embedding among them) open the next chunk."""
        moved = Chunk(cur.tokens[split_at:], cur.weights[split_at:],
                      [(off - split_at, emb) for off, emb in cur.fixes if off >= split_at])
        cur.tokens, cur.weights = cur.tokens[:split_at], cur.weights[:split_at]
        cur.fixes = [(off, emb) for off, emb in cur.fixes if off < split_at]
        flush()
        return moved


# ---------------------------------------------------------------------------------------------------------------
# Chunks -> token ids -> conditioning
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _PromptIds:
    """One prompt for one encoder: ids [77·k] where a negative id -(r+1) is row r of the prompt's own table (its
    embeddings' vectors in order of first use), weights [77·k] (None when all 1), those embeddings."""

    ids: torch.Tensor
    weights: torch.Tensor | None
    embeddings: tuple[Embedding, ...]
    names: list[str]  # of those embeddings
    length: int  # 77·k


@dataclass
class TokenBatch:
    """Prompts for one text encoder: ids [B, 77·k] (negative ids: rows of the table stacked from ``embeddings``, see
    utils/text_encoders.py), A1111's emphasis weights [B, 77·k] or None when all 1."""

    ids: torch.Tensor
    weights: torch.Tensor | None
    embeddings: list[Embedding]


class PromptTokenizer:
    """Prompts -> one :class:`TokenBatch` per text encoder, the way training, previews and inference all tokenize.

    A1111's chunking (:class:`PromptChunker`) with the embeddings given by name; prompts with fewer chunks than the
    longest in the batch are padded with empty chunks (A1111's batches). Each distinct prompt is tokenized once per
    encoder and kept (up to ``cache_size`` prompts): training asks every step, templates repeat a few prompts.
    """

    def __init__(self, tokenizers: list, embeddings: dict[str, Embedding], comma_backtrack: int = COMMA_BACKTRACK,
                 cache_size: int = 100_000):
        self.chunkers = [PromptChunker(t, EmbeddingLookup(t, embeddings), comma_backtrack) for t in tokenizers]
        self.cache_size = cache_size
        self._cache: dict[tuple[int, str], _PromptIds] = {}
        self._empty = [self._ids([c.empty_chunk()], ()) for c in self.chunkers]

    def tokenize(self, prompt: str) -> TokenizedPrompt:
        """The first encoder's view (the others chunk identically: same BPE, only the pad id differs)."""
        return self.chunkers[0](prompt)

    @staticmethod
    def _ids(chunks: list[Chunk], embeddings) -> _PromptIds:
        start, rows = {}, 0
        for emb in embeddings:
            start[emb.name] = rows
            rows += emb.num_vectors
        ids, weights = [], []
        for c, chunk in enumerate(chunks):
            tokens = list(chunk.tokens)
            for off, emb in chunk.fixes:
                first = start[emb.name]
                tokens[off + 1 : off + 1 + emb.num_vectors] = [-(first + j + 1) for j in range(emb.num_vectors)]
            ids += tokens
            weights += chunk.weights
        w = None if all(x == 1.0 for x in weights) else torch.tensor(weights)
        embeddings = tuple(embeddings)
        return _PromptIds(torch.tensor(ids, dtype=torch.long), w, embeddings, [e.name for e in embeddings], len(ids))

    def _one(self, k: int, prompt: str) -> _PromptIds:
        hit = self._cache.get((k, prompt))
        if hit is None:
            t = self.chunkers[k](prompt)
            hit = self._ids(t.chunks, t.embeddings.values())
            if len(self._cache) < self.cache_size:
                self._cache[(k, prompt)] = hit
        return hit

    def __call__(self, prompts: list[str], num_chunks: int | None = None) -> list[TokenBatch]:
        return [self._batch(k, prompts, num_chunks) for k in range(len(self.chunkers))]

    def _batch(self, k: int, prompts: list[str], num_chunks: int | None) -> TokenBatch:
        items = [self._one(k, p) for p in prompts]
        length = max([it.length for it in items] + [(num_chunks or 1) * WINDOW])
        order: dict[str, Embedding] = {}
        for it in items:
            for emb in it.embeddings:
                order.setdefault(emb.name, emb)
        names = list(order)
        empty = self._empty[k]
        weighted = any(it.weights is not None for it in items)
        ids, weights = [], []
        for it in items:
            # A prompt's own table is the start of the batch's when its embeddings come first in the same order
            # (always so in training: one embedding); otherwise its rows are renumbered.
            row = it.ids if it.names == names[: len(it.names)] else _renumbered(it, order)
            pad = (length - it.length) // WINDOW
            ids.append(torch.cat([row] + [empty.ids] * pad) if pad else row)
            if weighted:
                w = it.weights if it.weights is not None else torch.ones(it.length)
                weights.append(torch.cat([w] + [torch.ones(WINDOW)] * pad) if pad else w)
        return TokenBatch(torch.stack(ids), torch.stack(weights) if weighted else None, list(order.values()))


def _renumbered(item: _PromptIds, order: dict[str, Embedding]) -> torch.Tensor:
    """``item``'s ids with its own table rows renumbered into the table of the batch's embeddings ``order``."""
    start, rows = {}, 0
    for name, emb in order.items():
        start[name] = rows
        rows += emb.num_vectors
    mapping = [r for emb in item.embeddings for r in range(start[emb.name], start[emb.name] + emb.num_vectors)]
    new_rows = torch.tensor(mapping, dtype=torch.long)[(-item.ids - 1).clamp(min=0)]
    return torch.where(item.ids < 0, -(new_rows + 1), item.ids)


class PromptEncoder:
    """Prompt text (with embedding names) -> the conditioning tensors a diffusers pipeline takes.

    ``encode(prompts)`` -> :class:`Conditioning`; ``encode_pair(prompts, negatives)`` pads both to the same number of
    chunks (with the encoding of an empty chunk, as A1111's "pad cond/uncond") so classifier-free guidance can batch
    them. ``used_embeddings`` lists what the last encode call used (for the infotext's TI hashes).
    """

    def __init__(self, pipeline, db: EmbeddingDatabase | None = None, comma_backtrack: int = COMMA_BACKTRACK):
        self.pipeline = pipeline
        self.db = db if db is not None else EmbeddingDatabase([])
        self.comma_backtrack = comma_backtrack
        self.encoders = TextEncoders.of(pipeline)
        self.used_embeddings: dict[str, Embedding] = {}
        self._tokenizer: PromptTokenizer | None = None
        self._db_version = -1

    @property
    def expected_width(self) -> int:
        """A1111's expected embedding shape: SD-1 768, SD-2 1024, SDXL 768 + 1280."""
        return self.encoders.width

    def refresh(self) -> bool:
        """Pick up embedding files that changed since the last call (do this before each generation)."""
        return self.db.refresh(self.expected_width)

    def prompt_tokenizer(self) -> PromptTokenizer:
        if self._tokenizer is None or self._db_version != self.db.version:
            self._tokenizer = PromptTokenizer(self.encoders.tokenizers, self.db.loaded, self.comma_backtrack,
                                              cache_size=1000)
            self._db_version = self.db.version
        return self._tokenizer

    def tokenize(self, prompt: str) -> TokenizedPrompt:
        return self.prompt_tokenizer().tokenize(prompt)

    def count_tokens(self, prompt: str) -> tuple[int, int]:
        """(tokens used, limit) as A1111 shows them, e.g. (80, 150)."""
        t = self.tokenize(prompt)
        return t.token_count, t.token_limit

    def encode(self, prompts: list[str], num_chunks: int | None = None) -> Conditioning:
        batches = self.prompt_tokenizer()(list(prompts), num_chunks)
        self.used_embeddings = {e.name: e for e in batches[0].embeddings}
        devices = [s.text_encoder.device for s in self.encoders.slots]
        return self.encoders.encode(
            [b.ids.to(d) for b, d in zip(batches, devices)], self.encoders.tables_for(batches[0].embeddings),
            [None if b.weights is None else b.weights.to(d) for b, d in zip(batches, devices)])

    def encode_pair(self, prompts: list[str], negative_prompts: list[str]) -> tuple[Conditioning, Conditioning]:
        """Conditioning for prompts and negative prompts with the same number of chunks."""
        n = max(len(self.tokenize(p).chunks) for p in list(prompts) + list(negative_prompts))
        uncond = self.encode(negative_prompts, num_chunks=n)
        used_by_negative = self.used_embeddings
        cond = self.encode(prompts, num_chunks=n)
        self.used_embeddings = {**self.used_embeddings, **used_by_negative}
        return cond, uncond


def ti_hashes(embeddings: dict[str, Embedding]) -> str | None:
    """The infotext ``TI hashes`` value: "name: shorthash, …" (``:`` and ``,`` removed from names)."""
    parts = [f"{re.sub('[:,]', '', name)}: {emb.shorthash}" for name, emb in embeddings.items() if emb.shorthash]
    return ", ".join(parts) or None
