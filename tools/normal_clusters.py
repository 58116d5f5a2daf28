"""`python tools/normal_clusters.py` in a clone = the console script `uda-normal-clusters`; the code is
uda/commands/normal_clusters.py."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the clone's uda, installed or not
from uda.commands.normal_clusters import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
