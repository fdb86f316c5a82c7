"""Ray job entrypoint: ``ray job submit --working-dir . -- python -m jobs.prepare vg --root DIR --out DIR``
(or ``karpathy --json F --images-root DIR --out DIR``). The same code path as ``dvsa prepare``:
Ray tasks on the cluster it joins through RAY_ADDRESS; the inputs and the shards it writes are
on the shared volume every node mounts."""

from __future__ import annotations

import sys

from dvsa.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
