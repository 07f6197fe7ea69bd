"""requirements.lock pins a dependency set that passed the tests, and the README installs exactly it."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]


def locked() -> dict[str, str]:
    """name -> pinned version, from requirements.lock."""
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = re.fullmatch(r"([A-Za-z0-9_.\-]+)==(\S+)", line.strip()).groups()
            pins[canonicalize_name(name)] = version
    return pins


def direct_requirements() -> list[Requirement]:
    """The project's own requirements and those of its test extra (not the optional features)."""
    found = []
    for text in metadata.requires("instantstyle-trainer") or []:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate({"extra": "test"}):
            found.append(req)
    return found


def test_lock_pins_every_direct_requirement_within_its_range():
    pins = locked()
    for req in direct_requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not in requirements.lock: run .ci/lock"
        assert req.specifier.contains(pins[name], prereleases=True), f"lock has {req.name}=={pins[name]}, not {req}"


def test_the_environment_is_the_locked_one():
    """The suite runs on what the README's setup line installs (a local build label such as +cpu aside)."""
    pins = locked()
    drift = {}
    for req in direct_requirements():
        name = canonicalize_name(req.name)
        installed = Version(metadata.version(req.name))
        if Version(installed.public) != Version(pins[name]):
            drift[req.name] = (str(installed), pins[name])
    assert drift == {}, f"installed vs locked: {drift}; reinstall with the README's setup line"


def test_setup_line_installs_with_the_lock():
    ci = (REPO / ".ci" / "run").read_text()
    assert '-c requirements.lock -e ".[test]"' in ci
