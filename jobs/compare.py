"""Ray job entrypoint: ``ray job submit ... -- python -m jobs.compare --experiment NAME``: Table 5
(and Table 1) read back from the tracking server in MLFLOW_TRACKING_URI, printed into the
job's log. The same code path as ``dvsa compare``, which runs as well on a laptop with the
server forwarded to it."""

from __future__ import annotations

import sys

from dvsa.cli import main

if __name__ == "__main__":
    sys.exit(main(["compare", *sys.argv[1:]]))
