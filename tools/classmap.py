"""`python tools/classmap.py` in a clone = the console script `uda-classmap`; the code is uda/commands/classmap.py."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the clone's uda, installed or not
from uda.commands.classmap import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
