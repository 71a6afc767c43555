"""``exoctl``: the command line for an exo cluster, with kubectl's verbs and habits.

Every failure a user can cause is one ``error: ...`` line on stderr and a non-zero exit status
(1 for failures, 2 for a bad command line; ``diff`` uses 2 for every error), never a traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

from exo_ctl.api.meta import DNS1123_LABEL
from exo_ctl.api.resources import DEFAULT_NAMESPACE
from exo_ctl.cli import apply, config, delete, demo, describe, edit, get, model, token, wait
from exo_ctl.cli import maintenance
from exo_ctl.cli.common import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_USAGE, CliError, Context, UsageError, parse_duration, server_error
from exo_ctl.client import DEFAULT_TIMEOUT, HttpError, ClientConfigError, ConnectionFailed, load_config


class Parser(argparse.ArgumentParser):
    """argparse that raises UsageError (one line) instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


def global_options(*, on_subcommand: bool) -> Parser:
    """Options accepted before or after the command; on a subcommand they only override when given."""
    parser = Parser(add_help=False)
    default = argparse.SUPPRESS if on_subcommand else None
    parser.add_argument("--server", default=default, help="API URL (default: $EXOCTL_SERVER, the config file, "
                                                          "or http://127.0.0.1:52415)")
    parser.add_argument("--token", default=default, help="API token (default: $EXOCTL_TOKEN or the config file)")
    parser.add_argument("-n", "--namespace", default=default, help="namespace (default: default)")
    parser.add_argument("--request-timeout", default=default, metavar="DURATION",
                        help="give up on a request after this long, e.g. 10s (0: never); default 30s")
    return parser


def build_parser() -> Parser:
    parser = Parser(prog="exoctl", parents=[global_options(on_subcommand=False)],
                    description="Control an exo inference cluster the Kubernetes way.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    parents = [global_options(on_subcommand=True)]
    apply.add_parsers(subparsers, parents)
    get.add_parser(subparsers, parents)
    describe.add_parser(subparsers, parents)
    delete.add_parser(subparsers, parents)
    wait.add_parser(subparsers, parents)
    model.add_parser(subparsers, parents)
    demo.add_parser(subparsers, parents)
    token.add_parser(subparsers, parents)
    config.add_parser(subparsers, parents)
    edit.add_parsers(subparsers, parents)
    maintenance.add_parsers(subparsers, parents)
    return parser


def make_context(args: argparse.Namespace) -> Context:
    namespace = args.namespace
    if namespace is not None and (len(namespace) > 63 or not DNS1123_LABEL.match(namespace)):
        raise UsageError(f"invalid --namespace {namespace!r}: a namespace is a DNS-1123 label (lowercase letters, digits, '-')")
    timeout: float | None = DEFAULT_TIMEOUT
    if args.request_timeout is not None:
        timeout = parse_duration(args.request_timeout, flag="--request-timeout") or None
    try:
        config = load_config(server=args.server, token=args.token, timeout=timeout)
    except ClientConfigError as error:
        raise CliError(str(error)) from None
    return Context(config=config, namespace=namespace or DEFAULT_NAMESPACE, namespace_given=namespace is not None,
                   stdin=sys.stdin.buffer if sys.stdin else None)


def run(argv: list[str] | None) -> int:
    parser = build_parser()
    args = None
    try:
        args = parser.parse_args(argv)
        if not args.command:
            parser.print_help()
            return EXIT_USAGE
        return args.handler(args, make_context(args))
    except CliError as error:
        message, code = error.render(), error.code
    except HttpError as error:
        message, code = server_error(error).render(), EXIT_ERROR
    except (ConnectionFailed, ClientConfigError) as error:
        message, code = f"error: {error}", EXIT_ERROR
    if args is not None and code == EXIT_ERROR:
        code = getattr(args, "error_code", code)
    print(message, file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    try:
        return run(argv)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (exoctl get | head): stop quietly, and keep Python from
        # complaining while it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR
    except Exception as error:  # noqa: BLE001 — a bug must still be one line, not a traceback
        if os.environ.get("EXOCTL_DEBUG"):
            raise
        print(f"error: internal error: {type(error).__name__}: {error} (set EXOCTL_DEBUG=1 for a traceback)",
              file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
