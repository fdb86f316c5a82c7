"""The ``dvsa`` command line.

Each subcommand lives in its own module under :mod:`dvsa.commands` exposing
``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``; this file only
dispatches, importing the module of the chosen command alone so ``dvsa --help`` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from dvsa import runtime

# name on the command line -> module under dvsa.commands
COMMANDS = {
    "synth": "synth",
    "prepare": "prepare",
    "stats": "stats",
    "train-align": "train_align",
    "train-caption": "train_caption",
    "evaluate": "evaluate",
    "features": "features",
    "tune": "tune",
    "compare": "compare",
    "caption": "caption",
    "search": "search",
    "demo": "demo",
    "snippets": "snippets",
}

_HELP = {
    "synth": "write a synthetic world in Visual Genome + Karpathy-split formats",
    "prepare": "turn VG or Karpathy-split data into WebDataset shards (+ manifest, vocab)",
    "stats": "region vs full-image caption statistics of prepared shards (table + PNG)",
    "train-align": "train the alignment model (BRNN + S_kl ranking loss) on Ray Train",
    "train-caption": "train the full-frame or region captioner (RNN/LSTM) on Ray Train",
    "evaluate": "evaluate a checkpoint (captions: BLEU/METEOR/ROUGE-L/CIDEr; alignment: R@K)",
    "features": "precompute frozen-CNN features once as feature shards (Ray Data job)",
    "tune": "run a Ray Tune sweep over a config's search space, recorded in MLflow",
    "compare": "read an MLflow experiment back and print the full-frame vs region table",
    "caption": "caption your own images (whole or given boxes) with a trained model",
    "search": "top-scoring regions of the test set for a text query",
    "demo": "the whole pipeline on a synthetic world on a local Ray, in minutes",
    "snippets": "MRF snippet alignment over a shard set -> region-snippet shards (Ray Data job)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dvsa", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        sub.add_parser(name, help=_HELP[name], add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    runtime.quiet_environment()
    argv = list(sys.argv[1:] if argv is None else argv)
    top = build_parser()
    # Parse only the global flags and the command name; the command parses the rest.
    verbose = False
    while argv and argv[0] in ("-v", "--verbose"):
        verbose = True
        argv.pop(0)
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        top.error(f"unknown command {name!r} (choose from {', '.join(COMMANDS)})")
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    module = importlib.import_module(f"dvsa.commands.{COMMANDS[name]}")
    parser = argparse.ArgumentParser(prog=f"dvsa {name}", description=_HELP[name])
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    from dvsa.config import ConfigError
    from dvsa.errors import DvsaError, raise_on_sigterm, was_terminated

    raise_on_sigterm()
    try:
        return int(module.run(args) or 0)
    except ConfigError as e:
        print(f"dvsa {name}: config error: {e}", file=sys.stderr)
        return 2
    except DvsaError as e:
        print(f"dvsa {name}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if was_terminated():
            print(f"dvsa {name}: terminated (SIGTERM)", file=sys.stderr)
            return 143
        print(f"dvsa {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
