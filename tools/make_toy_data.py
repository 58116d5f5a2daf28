"""`python tools/make_toy_data.py` in a clone = the console script `uda-make-toy-data`; the code is uda/commands/make_toy_data.py."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the clone's uda, installed or not
from uda.commands.make_toy_data import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
