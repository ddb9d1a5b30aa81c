"""The lock file that `make` installs from: every package pinned, and every pin inside pyproject.toml's ranges."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[^\s;#]+)")


def read_lock(path: Path) -> dict[str, Version]:
    """``{canonical name: pinned version}``; raises on a requirement line that is not an exact pin."""
    pins: dict[str, Version] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        m = PIN.match(text)
        if not m:
            raise AssertionError(f"{path.name} line {lineno}: not an exact pin: {text!r}")
        pins[canonicalize_name(m["name"])] = Version(m["version"])
    return pins


def project_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]


def test_the_lock_pins_every_requirement_of_pyproject_inside_its_range():
    pins = read_lock(ROOT / "requirements.lock")
    assert len(pins) > 50  # the full set, transitive dependencies included (torch alone brings ~20)
    problems = []
    for req in project_requirements():
        name = canonicalize_name(req.name)
        if name not in pins:
            problems.append(f"{req.name}: not in the lock")
        elif not req.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{req.name}: locked {pins[name]} is outside {req.specifier}")
    assert not problems, "requirements.lock is stale; run `make lock`:\n" + "\n".join(problems)


def test_the_lock_check_catches_a_pin_outside_the_range_and_a_loose_line(tmp_path):
    lock = tmp_path / "requirements.lock"
    lock.write_text("numpy==1.0.0\n    # via liverus\n")
    numpy = next(r for r in project_requirements() if r.name == "numpy")
    assert not numpy.specifier.contains(read_lock(lock)["numpy"])
    lock.write_text("numpy>=1.26\n")
    with pytest.raises(AssertionError, match="not an exact pin"):
        read_lock(lock)


def test_the_environment_runs_what_the_lock_pins():
    """The installed versions are the locked ones (`make` installs from the lock; a stale venv shows here)."""
    from importlib.metadata import PackageNotFoundError, version

    pins = read_lock(ROOT / "requirements.lock")
    drift = []
    for req in project_requirements():
        name = canonicalize_name(req.name)
        try:
            installed = Version(version(req.name))
        except PackageNotFoundError:
            drift.append(f"{req.name}: not installed")
            continue
        # Local build tags (torch's +cu130) are the same release.
        if Version(installed.base_version) != Version(pins[name].base_version):
            drift.append(f"{req.name}: installed {installed}, locked {pins[name]}")
    assert not drift, "the environment differs from requirements.lock; rerun `make venv`:\n" + "\n".join(drift)
