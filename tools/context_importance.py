"""`python tools/context_importance.py` in a clone = the console script `uda-context-importance`; the code is
uda/commands/context_importance.py."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the clone's uda, installed or not
from uda.commands.context_importance import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
