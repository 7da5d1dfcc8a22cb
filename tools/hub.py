"""Publish a finished run's output folder on the Hugging Face Hub later, from any machine with network (a run on an
offline cluster node could not upload), or only (re)write its model card.

    python -m tools.hub OUTPUT_DIR --hub_model_id you/my-embedding
    python -m tools.hub OUTPUT_DIR --card_only

The card and the upload are utils/hub.py; README "Publish on the Hugging Face Hub" describes them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from utils import hub
from utils.errors import exit_on_user_error

PROG = "python -m tools.hub"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="The model card of a trained embedding or hypernetwork, and "
                                "publishing a run's final files on the Hugging Face Hub. Writes the card of a "
                                "finished run's output folder and uploads it with its files.")
    p.add_argument("output_dir", help="A training run's --output_dir (it holds training_settings.json).")
    p.add_argument("--hub_model_id", default=None, help="Repository, 'name' or 'owner/name' (default: the folder's "
                                                        "name under your account).")
    p.add_argument("--hub_token", default=None, help="Token (default: HF_TOKEN or your saved login).")
    p.add_argument("--card_only", action="store_true", help="Only (re)write README.md; upload nothing.")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    with exit_on_user_error(PROG):
        out_dir = Path(a.output_dir)
        if a.card_only:
            path = hub.write_model_card(out_dir, hub.card_info(out_dir, hub.read_settings(out_dir),
                                                                repo_id=a.hub_model_id))
            print(path or "card not written")
            return 0
        hub.read_settings(out_dir)  # a folder that is not a run's output fails first
        target = hub.HubTarget(a.hub_model_id, a.hub_token)
        hub.check_can_push(target)
        repo_id = hub.publish(out_dir, target)
    print(f"Published: https://huggingface.co/{repo_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
