"""Command line: `python -m fastinfer env | generate PROMPT`."""
from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastinfer", description="fastinfer command line")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("env", help="versions, build and op report")
    args = parser.parse_args(argv)
    if args.command == "env":
        from .env import env
        print(env())
    return 0
