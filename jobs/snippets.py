"""Ray job entrypoint: ``ray job submit --working-dir . -- python -m jobs.snippets --checkpoint
ALIGN --shards DIR --out DIR``. The same code path as ``dvsa snippets``: it joins the cluster
through RAY_ADDRESS (set by ``ray job submit``), or starts a local Ray when run by hand."""

from __future__ import annotations

import sys

from dvsa.cli import main

if __name__ == "__main__":
    sys.exit(main(["snippets", *sys.argv[1:]]))
