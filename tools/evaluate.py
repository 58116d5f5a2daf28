"""Evaluate a trained run on a dataset split (the `uda-evaluate` command; see uda/commands/evaluate.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from uda.commands.evaluate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
