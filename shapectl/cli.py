"""shapectl: the operator CLI. Subcommand modules register themselves on the parser."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

import grpc

from shapectl.channels import ChannelError, add_security_args, client_security, leader_of
from shapectl.commands import (
    agent,
    classify,
    cluster,
    demo,
    emergency,
    instance,
    plan,
    profile,
    simulate,
    trace,
)
from shapectl.targets import TargetError
from shapeshifter.net.transport import split_addresses

# Each module exposes register(subparsers); its subparsers set `func(args) -> int`.
COMMAND_MODULES = [agent, instance, profile, classify, cluster, demo, simulate, emergency, plan,
                   trace]

DEFAULT_COORDINATOR = "127.0.0.1:50050"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shapectl", description="shapeshifter control CLI")
    parser.add_argument("--agent", metavar="ADDR", help="talk to this nodeagent directly")
    parser.add_argument(
        "--coordinator",
        metavar="ADDR",
        default=os.environ.get("SHAPECTL_COORDINATOR", DEFAULT_COORDINATOR),
        help="coordinator address, or replicas' addresses comma-separated (the leader is "
             "found) (default: $SHAPECTL_COORDINATOR or %(default)s)",
    )
    parser.add_argument("--timeout", type=float, default=10.0, metavar="S", help="RPC timeout")
    add_security_args(parser, os.environ)  # --tls-cert --tls-key --tls-ca --token
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMAND_MODULES:
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        args.security = client_security(args)
        if "," in args.coordinator:  # replicas: talk to the one that leads
            args.coordinator = leader_of(split_addresses(args.coordinator), args.security)
        return func(args)
    except grpc.RpcError as err:
        print(_one_line(f"error: {err.code().name}: {err.details()}"), file=sys.stderr)
        return 1
    except (TargetError, ChannelError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _one_line(text: str) -> str:
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
