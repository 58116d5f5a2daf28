"""`python tools/model_stats.py` in a clone = the console script `uda-model-stats`; the code is uda/commands/model_stats.py."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the clone's uda, installed or not
from uda.commands.model_stats import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
