"""pyproject.toml's ranges and the committed lock: what the image and CI install."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def runtime_ranges() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    ranges = {}
    for requirement in project["dependencies"]:
        name, spec = re.match(r"([A-Za-z0-9_.-]+)\s*(.*)", requirement).groups()  # type: ignore[union-attr]
        ranges[name.lower().replace("_", "-")] = spec
    return ranges


def locked() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        match = re.match(r"([a-z0-9_.-]+)==([^\s;]+)", line)
        if match:
            pins[match[1]] = match[2]
    return pins


def test_runtime_dependencies_are_ranges_from_a_tested_floor_to_the_next_major() -> None:
    for name, spec in runtime_ranges().items():
        match = re.fullmatch(r">=(\d+)\.([\d.]+),<(\d+)", spec)
        assert match, f"{name}{spec}: expected >=FLOOR,<NEXT_MAJOR"
        assert int(match[3]) == int(match[1]) + 1, (
            f"{name}{spec}: upper bound is not the next major"
        )


def test_the_lock_pins_every_runtime_dependency_at_its_floor() -> None:
    pins = locked()
    for name, spec in runtime_ranges().items():
        floor = spec.split(",")[0].removeprefix(">=")
        assert pins.get(name) == floor, (
            f"{name}: requirements.lock has {pins.get(name)}, pyproject.toml's floor is {floor}; "
            "run `make lock`"
        )
