"""`python tools/export.py` in a clone = the console script `uda-export`; the code is uda/commands/export.py."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the clone's uda, installed or not
from uda.commands.export import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
