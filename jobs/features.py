"""``ray job submit --working-dir . -- python -m jobs.features --config CFG --out DIR [key=value ...]``.

The same job as ``dvsa features``: on a cluster when ``RAY_ADDRESS`` is set, else an
embedded local Ray.
"""

from __future__ import annotations

import sys

from dvsa.cli import main

if __name__ == "__main__":
    sys.exit(main(["features", *sys.argv[1:]]))
