"""MkDocs hooks (mkdocs.yml ``hooks:``): the command-line reference page ``cli.md`` is generated from liverus's own
argparse parsers at build time, so it always matches the installed commands."""

from __future__ import annotations

from mkdocs.structure.files import File


def on_files(files, config):
    from liverus.cli.reference import cli_reference_markdown

    files.append(File.generated(config, "cli.md", content=cli_reference_markdown()))
    return files
