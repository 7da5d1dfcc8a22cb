"""Print the README's flag reference tables from the scripts' own parsers (so the two cannot drift apart).

    python tools/flag_reference.py            # print them
    python tools/flag_reference.py --write    # replace the tables in README.md's "Flag reference" section
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


def write_readme(readme: Path = ROOT / "README.md") -> None:
    """Replace everything from the first table heading under '## Flag reference' up to the next '## ' section."""
    lines = readme.read_text(encoding="utf-8").splitlines(keepends=True)
    section = next(i for i, line in enumerate(lines) if line.startswith("## Flag reference"))
    start = next(i for i in range(section, len(lines)) if lines[i].startswith(f"#### `{SCRIPTS[0]}.py`"))
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("## "))
    tables = "\n".join(markdown(m) for m in SCRIPTS) + "\n"
    readme.write_text("".join(lines[:start]) + tables + "".join(lines[end:]), encoding="utf-8")


if __name__ == "__main__":
    if "--write" in sys.argv[1:]:
        write_readme()
    else:
        print("\n".join(markdown(m) for m in SCRIPTS))
