"""Each overlay is rendered once per session; the tests read the rendered objects."""

from __future__ import annotations

import pytest

from tests.kubernetes.kube import DEPLOY, OVERLAYS, Resource, render


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[Resource]]:
    return {overlay: render(DEPLOY / "overlays" / overlay) for overlay in OVERLAYS}


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest, rendered: dict[str, list[Resource]]) -> str:
    name: str = request.param
    return name
