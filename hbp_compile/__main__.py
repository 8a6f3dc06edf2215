"""``python -m hbp_compile explain module:factory [--k K] [--gamma G]``: print the explain() report.

The factory is a callable (a function or a class) returning ``(model, example_args)``; the model is
captured on those arguments, on a copy, with the random-number state restored.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .api import explain


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hbp_compile", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser("explain", help="print what Highway-BP would rewrite in a model")
    cmd.add_argument("target", help="module:factory, the factory returning (model, example_args)")
    cmd.add_argument("--k", type=lambda v: v if v == "auto" else int(v), default=3, help="an int, or auto")
    cmd.add_argument("--gamma", type=float, default=0.0)
    args = parser.parse_args(argv)
    module_name, sep, attr = args.target.partition(":")
    if not sep or not module_name or not attr:
        parser.error(f"target must be module:factory (e.g. mypkg.models:make_model), got {args.target!r}")
    factory = getattr(importlib.import_module(module_name), attr)
    made = factory()
    if not (isinstance(made, tuple) and len(made) == 2):
        parser.error(f"{args.target} must return (model, example_args), got {type(made).__name__}")
    model, example = made
    print(explain(model, *example, k=args.k, gamma=args.gamma))
    return 0


if __name__ == "__main__":
    sys.exit(main())
