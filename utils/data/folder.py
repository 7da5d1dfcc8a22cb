"""Folder datasets (``--train_data_dir``): images with optional <stem>.txt captions, listed without decoding.

Start-up reads the folder's names only (one directory listing, which also tells which images have a .txt). Folders
of up to ``PRECHECK_MAX`` images are checked right away (image headers and captions, well under a second), as are
folders scanned with ``--verify_images`` (a full decode) or ``--enable_buckets`` (headers, for the bucket sizes), with a
progress bar when long. Otherwise an image or caption is read when training first uses it; a bad one is reported in
skipped_images.txt and replaced by another image of its bucket, chosen from (seed, epoch, position), so the run is
the same with any number of processes or workers and after a resume.

The epoch's order is a function of (seed, epoch, global batch size G) only: ``epoch_plan_array`` cuts the shuffled
buckets into global batches of G examples of one bucket, and rank r takes the slice [r*b, (r+1)*b) of each.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from utils.data.config import DataConfig
from utils.data.items import Use, make_item
from utils.data.plan import epoch_plan_array, item_rng, sample_positions
from utils.data.prompts import caption_from_filename, read_caption_file
from utils.data.sources import DatasetSummary, Example, Skipped
from utils.errors import UserError
from utils.images import ImageLoadError, image_size, is_image_file, open_image

# Folders with at most this many images are checked up front (headers and captions: well under a second).
PRECHECK_MAX = 4096
# Files in a training folder that are neither images nor skipped-and-reported: captions and common side-cars.
_SIDECAR_EXTENSIONS = {".txt", ".json", ".jsonl", ".csv", ".md", ".npz", ".safetensors", ".caption", ".tags"}


def list_folder(root: str | os.PathLike, recursive: bool) -> tuple[list[str], set[str], list[Skipped]]:
    """Image files under ``root`` as sorted relative POSIX paths (A1111 uses OS order), the relative paths (without
    the suffix) that have a .txt beside them, and the other files, reported as skipped (not images and not
    caption/side-car files). Hidden entries are ignored. Names only: nothing is opened."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"--train_data_dir {root} is not a folder")
    images, txt, skipped = [], set(), []
    if recursive:
        walker = os.walk(root)
    else:
        walker = [(str(root), [], [e.name for e in os.scandir(root) if e.is_file()])]
    for dirpath, dirnames, filenames in walker:
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = os.path.relpath(dirpath, root).replace(os.sep, "/")
        prefix = "" if rel_dir == "." else rel_dir + "/"
        for name in filenames:
            if name.startswith("."):
                continue
            if is_image_file(name):
                images.append(prefix + name)
            else:
                suffix = os.path.splitext(name)[1]
                if suffix == ".txt":
                    txt.add(prefix + name[:-4])
                if suffix.lower() not in _SIDECAR_EXTENSIONS:
                    skipped.append(Skipped(str(root / (prefix + name)), "not an image file"))
    images.sort()
    return images, txt, skipped


class FolderIndex:
    """The usable images of a folder, compactly (a name list and small arrays: ~100 bytes an image)."""

    def __init__(self, cfg: DataConfig, names: list[str], has_txt: np.ndarray, bucket_ids: np.ndarray,
                 buckets: list[tuple[int, int]], sizes: np.ndarray | None, captions: list[str] | None):
        self.root = str(Path(cfg.train_data_dir))
        self.names = names
        self.has_txt = has_txt
        self.bucket_ids = bucket_ids
        self.buckets = buckets
        self.sizes = sizes
        self.captions = captions
        self.word_regex, self.join_string = cfg.filename_word_regex, cfg.filename_join_string
        self._members: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.names)

    def path(self, i: int) -> str:
        return os.path.join(self.root, self.names[i])

    def caption(self, i: int) -> str:
        """The caption (read from the .txt now unless the scan read it); ValueError for an unreadable .txt."""
        if self.captions is not None:
            return self.captions[i]
        if self.has_txt[i]:
            return read_caption_file(os.path.join(self.root, os.path.splitext(self.names[i])[0] + ".txt"))
        return caption_from_filename(Path(self.names[i]).stem, self.word_regex, self.join_string)

    def bucket(self, i: int) -> tuple[int, int]:
        return self.buckets[int(self.bucket_ids[i])]

    def members(self, bucket_id: int) -> np.ndarray:
        if bucket_id not in self._members:
            self._members[bucket_id] = np.flatnonzero(self.bucket_ids == bucket_id)
        return self._members[bucket_id]

    def example(self, i: int) -> Example:
        size = tuple(int(x) for x in self.sizes[i]) if self.sizes is not None else None
        return Example(i, self.path(i), self.caption(i), bool(self.has_txt[i]), size, self.bucket(i))

    def examples(self) -> "FolderExamples":
        return FolderExamples(self)


class FolderExamples(Sequence):
    """``Example`` objects made on access (a caption is read when its example is looked at)."""

    def __init__(self, index: FolderIndex):
        self.index = index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.index.example(k) for k in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.index.example(i)


def scan_folder(cfg: DataConfig, progress: bool = True) -> DatasetSummary:
    names, txt, skipped = list_folder(cfg.train_data_dir, cfg.recursive)
    small = len(names) <= PRECHECK_MAX
    read_sizes = small or cfg.verify_images or cfg.enable_buckets
    read_captions = small or cfg.verify_images
    root = Path(cfg.train_data_dir)
    has_txt = np.fromiter((os.path.splitext(n)[0] in txt for n in names), dtype=bool, count=len(names))
    sizes, captions, keep = None, None, None
    if read_sizes:
        from tqdm.auto import tqdm

        what = "decoding images" if cfg.verify_images else "reading image headers"
        bar = tqdm(total=len(names), desc=f"{what} in {root}", unit="img",
                   disable=not progress or (small and not cfg.verify_images))
        sizes_l, captions_l, keep = [], [], []
        for i, name in enumerate(names):
            bar.update(1)
            path = root / name
            try:
                size = open_image(path).rgb.size if cfg.verify_images else image_size(path)
                caption = None
                if read_captions:
                    caption = read_caption_file(path.with_suffix(".txt")) if has_txt[i] else \
                        caption_from_filename(path.stem, cfg.filename_word_regex, cfg.filename_join_string)
            except (ImageLoadError, ValueError) as e:
                skipped.append(Skipped(str(path), str(e)))
                continue
            keep.append(i)
            sizes_l.append(size)
            captions_l.append(caption)
        bar.close()
        names = [names[i] for i in keep]
        has_txt = has_txt[keep] if keep else has_txt[:0]
        sizes = np.array(sizes_l, dtype=np.int32).reshape(-1, 2)
        captions = captions_l if read_captions else None
    if cfg.enable_buckets:
        buckets_all = cfg.bucket_sizes()
        targets = [cfg.target_for((int(w), int(h)), buckets_all) for w, h in sizes]
        buckets = sorted(set(targets))
        ids = {b: k for k, b in enumerate(buckets)}
        bucket_ids = np.array([ids[t] for t in targets], dtype=np.int32)
    else:
        buckets = [(cfg.width, cfg.height)]
        bucket_ids = np.zeros(len(names), dtype=np.int32)
    index = FolderIndex(cfg, names, has_txt, bucket_ids, buckets, sizes, captions)
    counts = Counter(bucket_ids.tolist())
    summary = DatasetSummary("folder", len(names), skipped, {buckets[k]: n for k, n in counts.items()},
                             has_captions=bool(has_txt.any()) or bool(cfg.filename_word_regex), folder=index)
    if not read_captions:
        summary.notes.append(f"images and captions are checked when training first reads them (folders of up to "
                             f"{PRECHECK_MAX} images, or with --verify_images, are checked up front)")
    return summary


class FolderBatches:
    """This rank's micro-batches of a folder dataset: ``plans`` says which examples (cheap), ``make`` decodes."""

    def __init__(self, index: FolderIndex, cfg: DataConfig, *, seed: int, rank: int, world_size: int,
                 batch_size: int, per_epoch: int):
        self.index, self.cfg, self.seed = index, cfg, seed
        self.rank, self.world_size, self.batch_size, self.per_epoch = rank, world_size, batch_size, per_epoch

    def plans(self, epoch: int, start: int, progress: bool = False):
        """Endless (epoch, micro-batch, example indices, []) from micro-batch ``start`` of ``epoch`` on."""
        G, lo = self.batch_size * self.world_size, self.rank * self.batch_size
        while True:
            plan = epoch_plan_array(self.index.bucket_ids, self.index.buckets, G, self.seed, epoch, self.cfg.repeats)
            for j in range(start, self.per_epoch):
                yield epoch, j, plan[j, lo:lo + self.batch_size], []
            epoch, start = epoch + 1, 0

    def _use(self, i: int) -> Use:
        index = self.index
        path = index.path(i)
        from utils.latents import file_identity

        return Use(name=path, index=i, target=index.bucket(i), caption=lambda: index.caption(i),
                   image_id=lambda: file_identity(path), load=lambda: open_image(path))

    def make(self, ctx, epoch: int, j: int, indices) -> tuple[list[dict], list]:
        """The items of one micro-batch; an image (or caption) that cannot be read is reported and replaced by
        another image of the same bucket, so the batch keeps its size and every rank its step count."""
        items, skipped = [], []
        for pos, idx in zip(sample_positions(j, self.rank, self.batch_size, self.world_size), indices):
            idx = int(idx)
            for cand in self._candidates(idx, epoch, pos):
                try:
                    items.append(make_item(ctx, self._use(cand), epoch, pos))
                    break
                except (ImageLoadError, OSError, ValueError) as e:
                    skipped.append((self.index.path(cand), str(e)))
            else:
                w, h = self.index.bucket(idx)
                raise UserError(f"no image of bucket {w}x{h} can be loaded any more")
        return items, skipped

    def _candidates(self, idx: int, epoch: int, pos: int):
        yield idx
        pool = self.index.members(int(self.index.bucket_ids[idx]))
        for k in item_rng(self.seed, epoch, pos, 1).permutation(len(pool)):  # drawn only after a failure
            if int(pool[k]) != idx:
                yield int(pool[k])
