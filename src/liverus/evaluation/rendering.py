"""The Jinja2 templates of the reports (``liverus/evaluation/templates``) and the filters they format numbers with.

HTML templates (``*.html.j2``) are autoescaped: model labels, paths, configs and data warnings come from users' files
and must not become markup. Markdown templates (``*.md.j2``) are written as they are.
"""

from __future__ import annotations

import base64
import math
import re
from collections.abc import Callable
from functools import cache
from pathlib import Path

import yaml
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from markupsafe import Markup

from liverus.utils import atomic_write_text

__all__ = ["DISCLAIMER", "fmt", "ci", "environment", "render", "html_macro", "write_page"]

DISCLAIMER = (
    "Research software. Not a medical device and not a diagnosis: results must be interpreted by a "
    "qualified radiologist together with all clinical information."
)

# The line breaks that keep the templates readable are not part of the page: whitespace between two tags goes, as
# the pages were written before they had templates (whitespace between tags never shows, except between inline ones).
_BETWEEN_TAGS = re.compile(r">\s+<")


def fmt(x, digits: int = 3) -> str:
    """A number for a table; NaN/None become 'n/a'."""
    if x is None:
        return "n/a"
    if isinstance(x, float) and math.isnan(x):
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def ci(v, interval) -> str:
    """``v [low, high]``, or ``v`` alone when the interval is missing or has a missing end."""
    if interval is None or any(c is None or (isinstance(c, float) and math.isnan(c)) for c in interval):
        return fmt(v)
    return f"{fmt(v)} [{fmt(interval[0])}, {fmt(interval[1])}]"


def _png_base64(path: str | Path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode()


def _to_yaml(value) -> str:
    return yaml.safe_dump(value, sort_keys=False)


@cache
def environment() -> Environment:
    """The reports' environment (built once): templates from the package, undefined names are errors."""
    env = Environment(
        loader=PackageLoader("liverus.evaluation", "templates"),
        autoescape=select_autoescape(enabled_extensions=("html.j2",), disabled_extensions=("md.j2",)),
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=StrictUndefined,
    )
    env.filters.update(fmt=fmt, ci=ci, yaml=_to_yaml, png_base64=_png_base64, stem=lambda p: Path(p).stem)
    env.globals["DISCLAIMER"] = DISCLAIMER
    return env


def render(template: str, **context) -> str:
    """One template rendered; an HTML one without the whitespace between tags."""
    text = environment().get_template(template).render(**context)
    return _BETWEEN_TAGS.sub("><", text) if template.endswith(".html.j2") else text


def html_macro(name: str) -> Callable[..., Markup]:
    """A macro of ``_macros.html.j2`` callable from Python, for the fragments other modules assemble."""
    macro = getattr(environment().get_template("_macros.html.j2").module, name)

    def call(*args, **kwargs) -> Markup:
        return Markup(_BETWEEN_TAGS.sub("><", str(macro(*args, **kwargs))).strip())

    return call


def write_page(path: Path, template: str, *, title: str, subtitle: str = "", **context) -> Path:
    """Write a self-contained HTML report from a template extending ``report.html.j2``."""
    atomic_write_text(path, render(template, title=title, subtitle=subtitle, **context))
    return path
