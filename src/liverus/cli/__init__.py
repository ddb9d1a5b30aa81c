"""The ``liverus`` command line.

Each command group keeps its parser next to its handler: :mod:`~liverus.cli.data_commands` (``models``, ``data``),
:mod:`~liverus.cli.train_commands` (``train``, ``cv``, ``compare``, ``compare-studies``),
:mod:`~liverus.cli.eval_commands` (``evaluate``), :mod:`~liverus.cli.deploy_commands` (``predict``, ``explain``,
``serve``, ``export``) and :mod:`~liverus.cli.demo_command` (``demo``). Heavy imports happen inside each handler so
that ``liverus --help`` is instant. The library logs through :mod:`logging`; this module decides what reaches the
terminal (INFO and above on stderr, ``--quiet`` for warnings only).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import re
import sys

from liverus.cli import (
    data_commands,
    demo_command,
    deploy_commands,
    eval_commands,
    segment_commands,
    train_commands,
)
from liverus.utils import (
    FULL_INSTALL_ONLY,
    TORCH_PACKAGES,
    PyTorchMissingError,
    full_install_message,
    pytorch_missing_message,
)

__all__ = ["main", "build_parser"]

GROUPS = (data_commands, train_commands, segment_commands, eval_commands, deploy_commands, demo_command)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="liverus", description="Benign vs malignant liver lesions on B-mode ultrasound.")
    ap.add_argument("--quiet", "-q", action="store_true", help="show warnings and errors only")
    ap.add_argument(
        "--max-pixels",
        type=int,
        default=None,
        help="largest image (width x height) any command decodes (default 16777216 = 4096 x 4096; same as "
        "$LIVERUS_MAX_PIXELS); larger files are refused before decoding",
    )
    sub = ap.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.register(sub)
    return ap


def _configure_logging(quiet: bool) -> None:
    logger = logging.getLogger("liverus")
    for h in list(logger.handlers):
        logger.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False


# A box value that starts with a minus sign (a box reaching past the image's left or top edge).
_BOX_VALUE = re.compile(r"^-\d*\.?\d+(?:,-?\d*\.?\d+){3}$")


def _attach_box_values(argv: list[str]) -> list[str]:
    """``--box -5,-5,40,40`` as ``--box=-5,-5,40,40``: argparse reads a value that starts with ``-`` (and is not a
    plain negative number) as an option and stops with "expected one argument"."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] == "--box" and i + 1 < len(argv) and _BOX_VALUE.match(argv[i + 1]):
            out.append(f"--box={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(_attach_box_values(sys.argv[1:] if argv is None else list(argv)))
    _configure_logging(args.quiet)
    if args.max_pixels is not None:
        if args.max_pixels <= 0:
            print("error: --max-pixels must be positive", file=sys.stderr)
            return 2
        os.environ["LIVERUS_MAX_PIXELS"] = str(args.max_pixels)
    try:
        return int(args.func(args) or 0)
    # DataError, ConfigError and bad arguments are ValueErrors whose messages say how to fix them; a run folder or
    # output that exists (RunExistsError, check_new_file) is a FileExistsError that does too.
    except (ValueError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # In the ONNX-only install (no PyTorch), a command or option that needs PyTorch, or another package only the full
    # install has, says so and how to install it, rather than ending in a traceback.
    except PyTorchMissingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").partition(".")[0]
        # Only a package that is really absent is an install problem; a missing part of an installed package (a
        # moved submodule), or a module liverus does not declare, is a fault, shown in full.
        if missing not in FULL_INSTALL_ONLY or _installed(missing):
            raise
        if missing in TORCH_PACKAGES:
            print(f"error: {pytorch_missing_message(f'liverus {args.command}', exc.name)}", file=sys.stderr)
        else:
            print(f"error: {full_install_message(f'liverus {args.command}', exc.name)}", file=sys.stderr)
        return 2


def _installed(package: str) -> bool:
    """Whether the top-level ``package`` can be found (without importing it)."""
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False
