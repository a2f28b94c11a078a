"""Command-line conventions shared by `sims` and `sims k8s`: subcommands whose help reads alike."""

from __future__ import annotations

import argparse


def subcommand(sub: argparse._SubParsersAction, name: str, help: str, **kwargs) -> argparse.ArgumentParser:
    """A subcommand whose `--help` starts with the same sentence as its line in the parent's list (`sims --help`,
    `sims k8s --help`)."""
    kwargs.setdefault("description", help[0].upper() + help[1:] + ".")
    return sub.add_parser(name, help=help, **kwargs)
