"""The command-line reference page of the docs (``cli.md``), generated from the argparse parsers themselves, so it
cannot go stale: the MkDocs build (``tools/mkdocs_hooks.py``) writes it from :func:`cli_reference_markdown`."""

from __future__ import annotations

import argparse
import os

__all__ = ["cli_reference_markdown", "iter_commands"]


def iter_commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> list[tuple[tuple[str, ...], argparse.ArgumentParser, str]]:
    """Every command under ``parser``, depth first: ``(name path, its parser, its one-line help)``."""
    out = []
    for action in parser._actions:  # argparse keeps sub-commands only here; it offers no public walk
        if not isinstance(action, argparse._SubParsersAction):
            continue
        helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
        for name, sub in action.choices.items():
            out.append(((*path, name), sub, helps.get(name, "")))
            out.extend(iter_commands(sub, (*path, name)))
    return out


def cli_reference_markdown(parser: argparse.ArgumentParser | None = None) -> str:
    """Markdown: a table of every ``liverus`` command, then each command's full ``--help``."""
    if parser is None:
        from liverus.cli import build_parser

        parser = build_parser()
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"  # argparse wraps help text to the terminal; the page gets one fixed width
    try:
        commands = iter_commands(parser)
        lines = [
            "# Command line",
            "",
            "Every `liverus` command with its options, as `liverus COMMAND --help` prints them. This page is generated "
            "from the command-line parsers when the docs are built.",
            "",
            "| command | what it does |",
            "| --- | --- |",
        ]
        lines += [f"| [`liverus {' '.join(p)}`](#{'-'.join(p)}) | {h} |" for p, _, h in commands]
        lines += ["", "## `liverus`", "", "```text", parser.format_help().rstrip(), "```"]
        for p, sub, _ in commands:
            lines += [
                "",
                f"## `liverus {' '.join(p)}` {{ #{'-'.join(p)} }}",
                "",
                "```text",
                sub.format_help().rstrip(),
                "```",
            ]
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old
    return "\n".join(lines) + "\n"
