"""Streamed datasets (``--dataset_name``: a Hub id, or local parquet / arrow / imagefolder+metadata.jsonl /
WebDataset .tar), read with ``datasets``' streaming mode and never held in memory.

Start-up opens the stream (columns from its features) and takes the epoch length from the dataset's own row counts:
the Hub's split info, parquet footers, arrow record batches, the image files of an imagefolder, WebDataset tar headers
(read quickly, up to a budget; past it the rest is estimated from the file sizes). No pass over the images: a bad
row is reported in skipped_images.txt when training reads it.

Each rank reads its part (``datasets.distributed.split_dataset_by_node``: whole shards when num_shards % world_size
== 0, else every world_size-th row), shuffled with one shared seed through a buffer, and cuts it into one-bucket
micro-batches. Every rank takes the same number of micro-batches per epoch (from the row count), so ranks stay in
lockstep; a rank whose part runs out first continues into its next pass. The micro-batch sequence is computed the
same way by every DataLoader worker (each reads the rank's rows and decodes only its own micro-batches), so the
order does not depend on the number of workers. Resuming mid-epoch re-reads (without decoding) the rows of the
micro-batches already trained on.
"""

from __future__ import annotations

import os
from collections import deque
from pathlib import Path

from utils.data.config import DataConfig
from utils.data.items import Use, make_item
from utils.data.plan import sample_positions
from utils.data.sources import DatasetSummary, Skipped
from utils.errors import UserError
from utils.images import ImageLoadError, image_size, is_image_file, open_image_bytes

_BUILDER_BY_SUFFIX = {".parquet": "parquet", ".arrow": "arrow", ".tar": "webdataset", ".jsonl": "json", ".json": "json",
                      ".csv": "csv"}
_IMAGE_NAMES = ("image", "img", "png", "jpg", "jpeg", "webp")
_CAPTION_NAMES = ("text", "caption", "txt", "prompt", "captions")
_READ_CHUNK = 64  # rows per read from the stream
_REPLACEMENTS = 4  # earlier rows of a bucket kept as stand-ins for a row that fails to decode
# Row counting budgets (deterministic, so every rank and every rerun gets the same epoch length): past them the rest
# of the files is estimated from their sizes (local) or the average per file (remote).
_TAR_MEMBER_BUDGET = 200_000  # tar headers read exactly (~1 s)
_FILE_BUDGET = 2000  # parquet footers / arrow files opened exactly
_REMOTE_FILE_BUDGET = 16


# ---------------------------------------------------------------------------------------------------------------------
# Opening


def _builder(cfg: DataConfig):
    from datasets import load_dataset_builder

    name = cfg.dataset_name
    p = Path(name)
    try:
        if p.is_file():
            kind = _BUILDER_BY_SUFFIX.get(p.suffix.lower())
            if kind is None:
                raise UserError(f"--dataset_name {name}: unknown file type "
                                "(use parquet, arrow, tar, jsonl, csv or a folder)")
            return load_dataset_builder(kind, data_files={cfg.dataset_split: [str(p)]})
        return load_dataset_builder(name, cfg.dataset_config_name)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - any loader failure is a bad --dataset_name for the user
        raise UserError(f"cannot open dataset {name!r}: {type(e).__name__}: {' '.join(str(e).split())[:300]}") from None


def _stream_of(builder, cfg: DataConfig):
    try:
        return builder.as_streaming_dataset(split=cfg.dataset_split)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"cannot open dataset {cfg.dataset_name!r}: {type(e).__name__}: "
                        f"{' '.join(str(e).split())[:300]}") from None


def _columns(ds, cfg: DataConfig) -> tuple[str, str | None]:
    from datasets import Image as HFImage

    name = cfg.dataset_name
    features = ds.features or {}
    cols = list(features)
    image_col = cfg.image_column
    if image_col is None:
        image_col = next((c for c in cols if isinstance(features[c], HFImage)), None)
        image_col = image_col or next((c for c in _IMAGE_NAMES if c in cols), None)
    if image_col is None or (cols and image_col not in cols):
        raise UserError(f"dataset {name!r} has no image column {image_col or ''} (columns: {', '.join(cols)}); "
                        "use --image_column")
    caption_col = cfg.caption_column
    if caption_col is None:
        caption_col = next((c for c in _CAPTION_NAMES if c in cols), None)
    elif cols and caption_col not in cols:
        raise UserError(f"dataset {name!r} has no column {caption_col!r} (columns: {', '.join(cols)})")
    return image_col, caption_col


def _undecoded(ds, image_col: str):
    from datasets import Image as HFImage

    if isinstance((ds.features or {}).get(image_col), HFImage):
        ds = ds.cast_column(image_col, HFImage(decode=False))
    return ds


def open_stream(cfg: DataConfig):
    """(IterableDataset with the image column left undecoded, image column, caption column or None)."""
    ds = _stream_of(_builder(cfg), cfg)
    image_col, caption_col = _columns(ds, cfg)
    return _undecoded(ds, image_col), image_col, caption_col


# ---------------------------------------------------------------------------------------------------------------------
# Counting rows without reading them


def _split_files(builder, split: str) -> list[str]:
    files = getattr(builder.config, "data_files", None) or {}
    for k, v in files.items():
        if str(k) == split:
            return [str(f) for f in v]
    return []


def _is_local(f: str) -> bool:
    return "://" not in f and os.path.exists(f)


def _open_file(f: str):
    if _is_local(f):
        return open(f, "rb")
    import fsspec

    return fsspec.open(f, "rb").open()


def _tar_samples(f: str, budget: list[int]) -> int:
    """WebDataset samples in a tar (consecutive members sharing the name up to the first dot of the basename, as
    ``datasets`` groups them), from the 512-byte headers alone: the member data is seeked over, never read."""
    import tarfile

    if f.endswith((".gz", ".tgz", ".bz2", ".xz")):  # compressed: headers are not addressable, let tarfile read it
        with _open_file(f) as fh, tarfile.open(fileobj=fh, mode="r|*") as t:
            names = [m.name for m in t if m.isreg()]
        budget[0] -= len(names)
        return _count_keys(names)
    names, pos, long_name = [], 0, None
    with _open_file(f) as fh:
        while True:
            fh.seek(pos)
            header = fh.read(512)
            if len(header) < 512 or not header.strip(b"\0"):
                break
            size_field = header[124:136]
            size = int.from_bytes(size_field[1:], "big") if size_field[0] & 0x80 else \
                int(size_field.split(b"\0", 1)[0].strip() or b"0", 8)
            kind = header[156:157]
            if kind in (b"L", b"x"):  # GNU long name / pax header: the next member's path
                data = fh.read(size)
                if kind == b"L":
                    long_name = data.split(b"\0", 1)[0].decode("utf-8", "replace")
                else:
                    for rec in data.decode("utf-8", "replace").splitlines():
                        _, _, kv = rec.partition(" ")
                        if kv.startswith("path="):
                            long_name = kv[5:]
            elif kind in (b"0", b"\0", b"7"):  # a regular file
                names.append(long_name or _header_name(header))
                long_name = None
            else:
                long_name = None
            pos += 512 + (size + 511) // 512 * 512
    budget[0] -= len(names)
    return _count_keys(names)


def _header_name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0]
    if header[257:262] == b"ustar" and header[345]:  # ustar: a path prefix of up to 155 bytes
        name = header[345:500].split(b"\0", 1)[0] + b"/" + name
    return name.decode("utf-8", "replace")


def _count_keys(names: list[str]) -> int:
    count, last = 0, None
    for name in names:
        base = name.rsplit("/", 1)[-1]
        if base.startswith((".", "__")) or "." not in base:
            continue
        key = name[:len(name) - len(base)] + base.split(".", 1)[0]
        if key != last:
            count, last = count + 1, key
    return count


def _parquet_rows(f: str, budget: list[int]) -> int:
    import pyarrow.parquet as pq

    budget[0] -= 1
    with _open_file(f) as fh:
        return pq.ParquetFile(fh).metadata.num_rows


def _arrow_rows(f: str, budget: list[int]) -> int:
    """Rows of an arrow file as ``datasets`` writes them (IPC stream format); memory-mapped, so only the record
    batch headers are touched."""
    import pyarrow as pa

    budget[0] -= 1
    source = pa.memory_map(f) if _is_local(f) else _open_file(f)
    with source as fh:
        return sum(b.num_rows for b in pa.ipc.open_stream(fh))


def count_rows(builder, split: str) -> tuple[int, bool, str] | None:
    """(rows, exact, where the number came from), or None when the format gives no cheap count."""
    splits = getattr(builder.info, "splits", None)
    if splits and split in splits and splits[split].num_examples:
        return int(splits[split].num_examples), True, "row count from the dataset's info"
    files = _split_files(builder, split)
    if not files:
        return None
    if builder.name == "imagefolder":
        return sum(1 for f in files if is_image_file(f)), True, "one row per image file"
    counter, budget = {"parquet": (_parquet_rows, _FILE_BUDGET), "webdataset": (_tar_samples, _TAR_MEMBER_BUDGET),
                       "arrow": (_arrow_rows, _FILE_BUDGET)}.get(builder.name, (None, 0))
    if counter is None:
        return None
    remote = not all(_is_local(f) for f in files)
    left = [_REMOTE_FILE_BUDGET if remote else budget]
    counted, total = [], 0
    for f in sorted(files):
        if left[0] <= 0:
            break
        total += counter(f, left)
        counted.append(f)
    rest = sorted(files)[len(counted):]
    if not rest:
        return total, True, f"rows counted from {builder.name} metadata of {len(files)} file(s)"
    if remote:
        estimate, basis = total + round(total / len(counted) * len(rest)), "the average per file"
    else:
        done = sum(os.path.getsize(f) for f in counted)
        estimate = total + round(total / max(1, done) * sum(os.path.getsize(f) for f in rest))
        basis = "their sizes"
    return estimate, False, (f"rows counted in {len(counted)} of {len(files)} {builder.name} file(s), the rest "
                             f"estimated from {basis}")


def _count_by_reading(cfg: DataConfig, progress: bool) -> int:
    """The fallback for formats without cheap counts: one pass over the rows (images not decoded)."""
    from tqdm.auto import tqdm

    ds, image_col, _ = open_stream(cfg)
    n = 0
    with tqdm(desc=f"counting rows of {cfg.dataset_name} (this format has no row count)", unit="row",
              disable=not progress) as bar:
        for _ in _rows(ds.select_columns([image_col])):
            n += 1
            bar.update(1)
    return n


def scan_stream(cfg: DataConfig, progress: bool = True) -> DatasetSummary:
    builder = _builder(cfg)
    ds = _stream_of(builder, cfg)
    image_col, caption_col = _columns(ds, cfg)
    counted = count_rows(builder, cfg.dataset_split)
    if counted is None:
        counted = (_count_by_reading(cfg, progress), True, "rows counted by reading the stream once")
    rows, exact, note = counted
    skipped: list[Skipped] = []
    if cfg.verify_images:
        rows = _verify(cfg, rows, skipped, progress)
        exact, note = True, "every image decoded by --verify_images"
    summary = DatasetSummary("stream", rows, skipped, {} if cfg.enable_buckets else {(cfg.width, cfg.height): rows},
                             has_captions=caption_col is not None, image_column=image_col,
                             caption_column=caption_col, exact=exact)
    summary.notes.append(f"{note}; images are checked when training reads them")
    return summary


def _verify(cfg: DataConfig, rows: int, skipped: list[Skipped], progress: bool) -> int:
    """--verify_images on a stream: decode every row once (a full pass, with a progress bar); usable rows."""
    from tqdm.auto import tqdm

    ds, image_col, caption_col = open_stream(cfg)
    n = 0
    with tqdm(total=rows, desc=f"decoding the images of {cfg.dataset_name}", unit="img", disable=not progress) as bar:
        for i, row in enumerate(_rows(ds)):
            bar.update(1)
            name = _row_name(row, f"{cfg.dataset_name}[{i}]")
            try:
                data, name = _row_image_bytes(row.get(image_col), name)
                open_image_bytes(data)
                if caption_col:
                    _row_caption(row.get(caption_col))
            except (ImageLoadError, ValueError, OSError) as e:
                skipped.append(Skipped(name, str(e)))
                continue
            n += 1
    return n


# ---------------------------------------------------------------------------------------------------------------------
# Rows


def _rows(ds):
    """Rows one by one, through ``iter(batch_size=...)``: iterating the dataset itself inside a DataLoader worker
    would make ``datasets`` give that worker only some of the shards (and the order would depend on the workers)."""
    for chunk in ds.iter(batch_size=_READ_CHUNK):
        cols = list(chunk)
        for values in zip(*(chunk[c] for c in cols)):
            yield dict(zip(cols, values))


def _row_image_bytes(value, fallback: str = "<bytes>") -> tuple[bytes, str]:
    """(bytes, a name for reports) from an undecoded image cell: {'bytes', 'path'}, raw bytes or a path."""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data is None and path:
            data = Path(path).read_bytes()
        if not data:
            raise ImageLoadError("empty image cell")
        return data, str(path or fallback)
    if isinstance(value, (bytes, bytearray)):
        if not value:
            raise ImageLoadError("empty image cell")
        return bytes(value), fallback
    if isinstance(value, str):
        return Path(value).read_bytes(), value
    raise ImageLoadError(f"unsupported image cell {type(value).__name__}")


def _row_caption(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8-sig").strip()
        except UnicodeDecodeError:
            raise ValueError("caption is not UTF-8") from None
    if isinstance(value, (list, tuple)):  # several captions per image: the first one
        return _row_caption(value[0]) if value else ""
    return str(value).strip()


def _row_name(row: dict, fallback: str) -> str:
    key, url = row.get("__key__"), row.get("__url__")
    return f"{url}:{key}" if key and url else fallback


class _Row:
    """One row as read: image bytes, caption cell, a name for reports, and its bucket."""

    __slots__ = ("data", "caption", "name", "bucket")

    def __init__(self, data: bytes, caption, name: str, bucket: tuple[int, int]):
        self.data, self.caption, self.name, self.bucket = data, caption, name, bucket


class StreamBatches:
    """This rank's micro-batches of a stream: ``plans`` reads rows and groups them (no decoding), ``make`` decodes."""

    def __init__(self, cfg: DataConfig, image_col: str, caption_col: str | None, *, seed: int, rank: int,
                 world_size: int, batch_size: int, per_epoch: int):
        self.cfg, self.image_col, self.caption_col, self.seed = cfg, image_col, caption_col, seed
        self.rank, self.world_size, self.batch_size, self.per_epoch = rank, world_size, batch_size, per_epoch
        self._ds = None
        self._buckets = cfg.bucket_sizes() if cfg.enable_buckets else None

    def _pass(self, p: int):
        """The rank's rows of pass ``p`` (its own shuffle), undecoded."""
        if self._ds is None:
            from datasets.distributed import split_dataset_by_node

            ds, _, _ = open_stream(self.cfg)
            ds = split_dataset_by_node(ds, rank=self.rank, world_size=self.world_size)
            self._ds = ds.shuffle(seed=self.seed, buffer_size=self.cfg.shuffle_buffer_size,
                                  max_buffer_input_shards=self.cfg.shuffle_buffer_shards)
        self._ds.set_epoch(p)
        return _rows(self._ds)

    def _name(self, row: dict, p: int, i: int) -> str:
        """A row's name in reports: its tar member, else where it came in this rank's shuffled pass and the start of
        its caption (a parquet row has no name of its own; the caption is something to search the data for)."""
        member = _row_name(row, "")
        if member:
            return member
        try:
            caption = _row_caption(row.get(self.caption_col)) if self.caption_col else ""
        except ValueError:
            caption = ""
        hint = f", caption {caption[:60]!r}" if caption else ""
        return f"{self.cfg.dataset_name}[pass {p}, rank {self.rank}, row {i} as shuffled{hint}]"

    def _row(self, row: dict, name: str) -> _Row:
        data, name = _row_image_bytes(row.get(self.image_col), name)
        if self.cfg.enable_buckets:
            target = self.cfg.target_for(image_size(data), self._buckets)
        else:
            target = (self.cfg.width, self.cfg.height)
        return _Row(data, row.get(self.caption_col) if self.caption_col else None, name, target)

    def plans(self, epoch: int, start: int, progress: bool = False):
        """Endless (epoch, micro-batch, (rows, stand-ins), skipped rows) from micro-batch ``start`` of ``epoch``.

        Epoch e starts at the beginning of pass e and takes ``per_epoch`` micro-batches, continuing into the next
        pass when the rank's rows run out. Rows whose image cell is empty (or, with buckets, whose header cannot be
        read) are left out and reported with the next micro-batch."""
        bar = None
        if progress and start > 0:
            from tqdm.auto import tqdm

            bar = tqdm(total=start, desc="resuming the stream: re-reading the rows already trained on",
                       unit="batch")
        while True:
            j, p, skipped = 0, epoch, []
            pending: dict[tuple[int, int], list[_Row]] = {}
            recent: dict[tuple[int, int], deque] = {}
            while j < self.per_epoch:
                dry = True
                for i, row in enumerate(self._pass(p)):
                    name = self._name(row, p, i)
                    try:
                        r = self._row(row, name)
                    except (ImageLoadError, OSError) as e:
                        skipped.append((name, str(e)))
                        continue
                    dry = False
                    group = pending.setdefault(r.bucket, [])
                    group.append(r)
                    if len(group) < self.batch_size:
                        continue
                    del pending[r.bucket]
                    stand_ins = recent.setdefault(r.bucket, deque(maxlen=_REPLACEMENTS))
                    if j >= start:
                        yield epoch, j, (group, tuple(stand_ins)), skipped
                    elif bar is not None:
                        bar.update(1)
                    stand_ins.extendleft(group)
                    skipped = []
                    j += 1
                    if j == self.per_epoch:
                        break
                if dry:
                    raise UserError(f"rank {self.rank} received no usable image from {self.cfg.dataset_name!r}")
                p += 1
            if bar is not None:
                bar.close()
                bar = None
            epoch, start = epoch + 1, 0

    def _use(self, r: _Row) -> Use:
        from utils.latents import bytes_identity

        return Use(name=r.name, index=-1, target=r.bucket, caption=lambda: _row_caption(r.caption),
                   image_id=lambda: bytes_identity(r.data), load=lambda: open_image_bytes(r.data))

    def make(self, ctx, epoch: int, j: int, plan) -> tuple[list[dict], list]:
        """The items of one micro-batch; a row that fails to decode is reported and replaced by the next one of the
        micro-batch that decodes, else by an earlier row of its bucket (the same choice on every worker)."""
        rows, stand_ins = plan
        items, skipped, bad = [], [], set()
        for k, pos in enumerate(sample_positions(j, self.rank, self.batch_size, self.world_size)):
            for cand in [rows[k]] + [r for r in rows if r is not rows[k]] + list(stand_ins):
                if id(cand) in bad:
                    continue
                try:
                    items.append(make_item(ctx, self._use(cand), epoch, pos))
                    break
                except (ImageLoadError, OSError, ValueError) as e:
                    bad.add(id(cand))
                    skipped.append((cand.name, str(e)))
            else:
                raise UserError(f"no image near micro-batch {j} of epoch {epoch} of {self.cfg.dataset_name!r} can be "
                                "decoded (see skipped_images.txt)")
        return items, skipped
