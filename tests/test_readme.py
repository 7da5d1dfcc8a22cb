"""The README's promises: the two commands on top, CI runs the test command, every flag documented."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def test_starts_with_setup_and_test_commands():
    first, second = _blocks(README)[:2]
    assert README.index("```bash") < README.index("---")  # both before anything else
    assert "pip install -r requirements.txt" in first and "python train_textual_inversion.py --demo" in first
    assert second.strip().endswith("python -m pytest -q")


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    test_command = _blocks(README)[1].strip().split("&&")[-1].strip()
    assert ci.strip().splitlines()[-1].strip() == test_command
    assert "requirements.txt" in ci and "requirements-nodeps.txt" in ci


@pytest.mark.parametrize("script", ["train_textual_inversion", "train_hypernetwork", "inference", "preprocess"])
def test_every_flag_is_documented(script):
    from tools.flag_reference import options, parser_of

    missing = [o for _, action in options(parser_of(script)) for o in action.option_strings
               if f"`{o}`" not in README]
    assert not missing, f"{script}.py flags missing from README.md: {missing}"
