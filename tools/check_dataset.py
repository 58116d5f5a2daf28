"""`python tools/check_dataset.py` in a clone = the console script `uda-check-dataset`; the code is uda/commands/check_dataset.py."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the clone's uda, installed or not
from uda.commands.check_dataset import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
