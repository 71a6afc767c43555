"""``exoctl model build``: write the project's small Llama-architecture test model, or a tiny
random-weight model of another mlx-lm family (``--family``), with no hub needed."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from exo_ctl.cli.common import CliError, Context


def add_parser(subparsers: Any, parents: list[argparse.ArgumentParser]) -> None:
    from exo_ctl.model_builder.build_family import FAMILIES
    from exo_ctl.model_builder.build_model import SIZES

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
    build.add_argument("--family", choices=sorted(FAMILIES),
                       help="instead: a tiny random-weight model of this mlx-lm family (needs --out)")
    build.add_argument("--bits", type=int, choices=(4, 8), help="with --family: quantize with mlx-lm's converter")
    build.set_defaults(handler=run_build)


def run_build(args: argparse.Namespace, ctx: Context) -> int:
    from exo_ctl.model_builder.build_model import build_model, build_model_at

    if args.family is None and args.bits is not None:
        raise CliError("--bits: only with --family")
    if args.family is not None:
        return _build_family(args, ctx)
    try:
        path = build_model_at(args.out, size=args.size, force=args.force) if args.out \
            else build_model(args.size, force=args.force)
    except OSError as error:
        raise CliError(f"--out {args.out or ''}: cannot write the model: {error.strerror or error}") from None
    ctx.out(str(path))
    return 0


def _build_family(args: argparse.Namespace, ctx: Context) -> int:
    from exo_ctl.model_builder.build_family import build_family_model

    if args.out is None:
        raise CliError("--family: give the model directory with --out DIR")
    out = Path(args.out).expanduser().resolve()
    if out.exists() and not args.force:
        raise CliError(f"--out {out}: already exists (use --force to replace it)")
    try:
        if out.exists():
            import shutil

            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        build_family_model(args.family, out, quantize_bits=args.bits)
    except OSError as error:
        raise CliError(f"--out {out}: cannot write the model: {error.strerror or error}") from None
    ctx.out(str(out))
    return 0
