"""The start-up scan: what is there to train on, found cheaply and before any model is loaded."""

from __future__ import annotations

import os

from utils.data.config import DataConfig, PromptConfig
from utils.data.prompts import TEMPLATES_DIR, resolve_template
from utils.data.sources import DatasetSummary, write_report
from utils.errors import UserError

_CAPTION_SAMPLE = 1000  # captions looked at for the caption-only warning when the scan did not read them all


def scan_dataset(cfg: DataConfig, prompt: PromptConfig | None = None,
                 report_file: str | os.PathLike | None = None, progress: bool = True) -> DatasetSummary:
    """List the usable images (see utils/data/folder.py and stream.py for what is read up front), write the skipped
    ones to ``report_file``, raise UserError when nothing is usable. Its cost does not grow with the images' size, and
    with their number only as a directory listing does (folders) or not at all (streams)."""
    if cfg.train_data_dir is not None:
        from utils.data.folder import scan_folder

        summary = scan_folder(cfg, progress)
    else:
        from utils.data.stream import scan_stream

        summary = scan_stream(cfg, progress)
    if report_file is not None:
        write_report(report_file, summary.skipped)
    if summary.num_examples == 0:
        where = cfg.train_data_dir or cfg.dataset_name
        detail = f" ({len(summary.skipped)} file(s) skipped" + (f", see {report_file})" if report_file else ")")
        raise UserError(f"no usable training image found in {where}{detail if summary.skipped else ''}")
    if prompt is not None:
        summary.warnings += _prompt_warnings(summary, prompt)
    return summary


def _prompt_warnings(summary: DatasetSummary, prompt: PromptConfig) -> list[str]:
    out = []
    if prompt.caption_only and summary.kind == "folder":
        index = summary.folder
        sampled = index.captions is None and len(index) > _CAPTION_SAMPLE
        checked = min(len(index), _CAPTION_SAMPLE) if sampled else len(index)
        missing = 0
        for i in range(checked):
            try:
                caption = index.caption(i)
            except ValueError:
                continue  # reported when training reads it
            if "[name]" not in caption and (not prompt.placeholder or prompt.placeholder not in caption):
                missing += 1
        if missing:
            of = f" of the first {checked}" if sampled else ""
            out.append(f"caption-only mode: {missing}{of} caption(s) contain neither [name] nor "
                       f"{prompt.placeholder!r}; those images cannot teach the new token")
    if not prompt.caption_only:
        path = resolve_template(prompt, summary.has_captions)
        text = path.read_text(encoding="utf-8", errors="replace") if path is not None else ""
        # hypernetwork.txt / none.txt leave [name] out on purpose (the HN is not named in its prompts)
        if path is not None and "[name]" not in text and prompt.placeholder and \
                path.resolve().parent != TEMPLATES_DIR.resolve():
            out.append(f"template {path.name} has no [name]: the prompts never contain {prompt.placeholder!r}")
    return out
