"""Command line: ``python -m kdkernels <command>``.

Commands live in their own modules and are imported only when run:
``info`` (versions and backends), ``check`` (every backend against the reference).
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, help); each module defines add_arguments(parser) and run(args) -> int
COMMANDS = {
    "info": ("kdkernels.tools.cli", "versions, and which backends run here (and why not)"),
    "check": ("kdkernels.tools.cli", "run every available backend on a default problem"),
    "bench": ("kdkernels.tools.bench", "time forward+backward of every implementation; CSV, table, PNG"),
    "topk-dump": ("kdkernels.topk", "store a teacher's top-k log-probabilities (sparse_kd_loss)"),
    "demo": ("kdkernels.tools.demo", "distil a small LM on the CPU: eager loss vs kdkernels, side by side"),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kdkernels", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_)
        mod = importlib.import_module(module)
        getattr(mod, f"add_{name.replace('-', '_')}_arguments", lambda _p: None)(p)
    args = parser.parse_args(argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    return int(getattr(module, f"run_{args.command.replace('-', '_')}")(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
