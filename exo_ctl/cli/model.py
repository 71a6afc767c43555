"""``exoctl model build``: write the project's small Llama-architecture test model (no hub needed)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from exo_ctl.cli.common import CliError, Context


def add_parser(subparsers: Any, parents: list[argparse.ArgumentParser]) -> None:
    from examples.build_model import SIZES

    model = subparsers.add_parser("model", parents=parents, help="local models",
                                  description="Work with models on this machine.")
    # The nested parsers are the same class as ``model`` (main's Parser: one-line usage errors).
    verbs = model.add_subparsers(dest="model_command", metavar="COMMAND", required=True, parser_class=type(model))
    build = verbs.add_parser("build", parents=parents, help="build the local test model and print its directory",
                             description="Build a small Llama-architecture model in Hugging Face layout "
                                         "(deterministic, cached) and print the directory to use as spec.model.source.")
    build.add_argument("--size", default="tiny", choices=sorted(SIZES),
                       help="tiny (~16M parameters, tests) or small (~150M, benchmarks); default tiny")
    build.add_argument("--out", type=Path, metavar="DIR",
                       help="model directory (default: $EXO_MODEL_CACHE or ~/.cache/exoctl/models, /SIZE)")
    build.add_argument("--force", action="store_true", help="rebuild even if an up-to-date build exists")
    build.set_defaults(handler=run_build)


def run_build(args: argparse.Namespace, ctx: Context) -> int:
    from examples.build_model import build_model, build_model_at

    try:
        path = build_model_at(args.out, size=args.size, force=args.force) if args.out \
            else build_model(args.size, force=args.force)
    except OSError as error:
        raise CliError(f"--out {args.out or ''}: cannot write the model: {error.strerror or error}") from None
    ctx.out(str(path))
    return 0
