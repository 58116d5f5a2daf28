"""`python tools/compare.py` in a clone = the console script `uda-compare`; the code is uda/commands/compare.py."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the clone's uda, installed or not
from uda.commands.compare import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
