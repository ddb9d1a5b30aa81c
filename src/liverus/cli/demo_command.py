"""``liverus demo`` (``make demo``): the README's main job."""

from __future__ import annotations

import argparse

__all__ = ["register"]


def cmd_demo(args: argparse.Namespace) -> int:
    from liverus.demo import run_demo

    return run_demo(args)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the main job: train the baseline and the attention model, print their metrics")
    p.add_argument("--data", help="data folder / manifest (default: the built-in synthetic phantom)")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--resume", action="store_true")
    p.set_defaults(func=cmd_demo)
