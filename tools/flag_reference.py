"""Print the README's flag reference tables from the scripts' own parsers (so the two cannot drift apart).

    python tools/flag_reference.py > /tmp/flags.md     # then paste into README.md
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ["train_textual_inversion", "train_hypernetwork", "inference", "preprocess"]


def parser_of(module_name: str) -> argparse.ArgumentParser:
    sys.path.insert(0, str(ROOT))
    return importlib.import_module(module_name).build_parser()


def options(parser: argparse.ArgumentParser):
    """(group title, [option strings], help) for every flag, in --help order."""
    for group in parser._action_groups:
        for action in group._group_actions:
            if action.option_strings and "--help" not in action.option_strings:
                yield group.title, action


def markdown(module_name: str) -> str:
    lines = [f"#### `{module_name}.py`", "", "| flag | default | what it does |", "|---|---|---|"]
    for _, action in options(parser_of(module_name)):
        flags = ", ".join(f"`{o}`" for o in action.option_strings)
        default = "" if action.default in (None, False, argparse.SUPPRESS, []) else f"`{action.default}`"
        text = " ".join((action.help or "").replace("%%", "%").replace("|", "\\|").split())
        if action.choices:
            text += f" Choices: {', '.join(map(str, action.choices))}."
        lines.append(f"| {flags} | {default} | {text} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print("\n".join(markdown(m) for m in SCRIPTS))
