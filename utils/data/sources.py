"""What a scan finds: the dataset summary both kinds of source produce, skipped inputs and their report file."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from utils.fileio import write_text_atomic


@dataclass
class Example:
    index: int
    path: str
    caption: str
    has_caption_file: bool
    size: tuple[int, int] | None  # (w, h) after EXIF orientation; None when the scan did not read the header
    bucket: tuple[int, int]  # training size (w, h)


@dataclass
class Skipped:
    path: str
    reason: str


@dataclass
class DatasetSummary:
    kind: str  # "folder" | "stream"
    num_examples: int  # folder: usable images; stream: rows (exact, or estimated when ``exact`` is False)
    skipped: list[Skipped]
    bucket_counts: dict[tuple[int, int], int]  # empty when sizes were not read (buckets decided as images come)
    has_captions: bool
    warnings: list[str] = field(default_factory=list)
    image_column: str | None = None
    caption_column: str | None = None
    folder: object | None = None  # utils.data.folder.FolderIndex
    exact: bool = True  # streams: whether num_examples was counted or estimated
    notes: list[str] = field(default_factory=list)  # how the data was counted and will be checked

    @property
    def examples(self):
        """Folder datasets: a read-only sequence of ``Example`` (captions read on access); streams: empty."""
        return self.folder.examples() if self.folder is not None else []

    def bucket_table(self) -> str:
        rows = [f"  {w}x{h}: {n} image{'s' if n != 1 else ''}" for (w, h), n in sorted(self.bucket_counts.items())]
        return "buckets (w x h):\n" + "\n".join(rows)

    def describe(self) -> str:
        if self.kind == "stream":
            lines = [f"{'' if self.exact else 'about '}{self.num_examples} rows"]
        else:
            lines = [f"{self.num_examples} usable image(s), {len(self.skipped)} skipped"]
        if self.bucket_counts:
            lines.append(self.bucket_table())
        lines += self.notes
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def write_report(path: str | os.PathLike, skipped: list[Skipped]) -> None:
    lines = ["# skipped training inputs: path<TAB>reason"] + [f"{s.path}\t{s.reason}" for s in skipped]
    write_text_atomic(path, "\n".join(lines) + "\n")
