"""``exoctl config kubeconfig [--ca FILE] [--context NAME]``: a kubeconfig for the node exoctl talks
to (server, token, cluster CA), so kubectl and the Kubernetes client libraries reach it::

    exoctl config kubeconfig --ca ~/.exo/cluster-ca.pem > exo.kubeconfig
    KUBECONFIG=exo.kubeconfig kubectl get md
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from exo_ctl.cli.common import CliError, Context, UsageError
from exo_ctl.kubeconfig import CONTEXT, kubeconfig


def add_parser(subparsers: Any, parents: list[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("config", parents=parents, help="print a kubeconfig for kubectl",
                                   description="Client configuration for other tools.")
    verbs = parser.add_subparsers(dest="config_command", metavar="VERB", parser_class=type(parser))
    printer = verbs.add_parser("kubeconfig", parents=parents, help="print a kubeconfig (server, token, CA)")
    printer.add_argument("--ca", dest="ca_file", help="the cluster CA (PEM), e.g. DATA_DIR/cluster-ca.pem "
                                                     "(default: the CA exoctl trusts)")
    printer.add_argument("--context", default=CONTEXT, help="the context, cluster and user name (default: exo)")
    printer.set_defaults(handler=run_kubeconfig)
    parser.set_defaults(handler=run_without_verb)


def run_without_verb(args: argparse.Namespace, ctx: Context) -> int:
    raise UsageError("config needs a verb: kubeconfig")


def run_kubeconfig(args: argparse.Namespace, ctx: Context) -> int:
    config = ctx.config
    if not config.token:
        raise CliError("a kubeconfig needs a token: pass --token, set EXOCTL_TOKEN, or mint one with "
                       "`exoctl token create --role edit`")
    ca_file = args.ca_file or getattr(config, "ca", None)
    ca_pem = None
    if ca_file:
        try:
            ca_pem = Path(ca_file).expanduser().read_bytes()
        except OSError as error:
            raise CliError(f"--ca: cannot read {ca_file}: {error.strerror or error}") from None
        if b"-----BEGIN CERTIFICATE-----" not in ca_pem:
            raise CliError(f"--ca: {ca_file} is not a PEM certificate")
    if config.server.startswith("https://") and ca_pem is None:
        raise CliError(f"{config.server} serves HTTPS: pass --ca with the cluster CA (the node's "
                       "DATA_DIR/cluster-ca.pem) so kubectl can verify it")
    if config.server.startswith("http://"):
        ctx.err(f"warning: {config.server} is plain HTTP and kubectl sends no token over HTTP: start the node "
                "with --tls on (or bind beyond loopback) and use its https:// URL")
    namespace = ctx.namespace
    ctx.out(yaml.safe_dump(kubeconfig(server=config.server, token=config.token, ca_pem=ca_pem, namespace=namespace,
                                      name=args.context), sort_keys=False).rstrip("\n"))
    return 0
