"""Knowledge export entries and lines for the seed and import tests: plain JSON, no database,
so the unit tests use them as well as the integration tests."""

from __future__ import annotations

import json

GOOD = {
    "id": "kb-x",
    "agent": "coder",
    "category": "runbook",
    "title": "A title",
    "content": "Some content.",
    "source": "doc:x",
    "tags": ["a", "b"],
    "metadata": {"confidence": 0.5},
}


def line(**changes: object) -> str:
    """``GOOD`` as one export line with ``changes``; a field changed to ``...`` is left out."""
    entry = {**GOOD, **changes}
    return json.dumps({k: v for k, v in entry.items() if v is not ...})


def numbered_entry(prefix: str, number: int, **changes: object) -> dict[str, object]:
    """Entry ``number`` of a test export, with id ``PREFIX-NUMBER`` and ``changes``."""
    return {
        "id": f"{prefix}-{number}",
        "agent": "ops-sre",
        "category": "runbook",
        "title": f"Entry {number}",
        "content": f"What was learned, take {number}.",
        "source": "test",
        "tags": ["t"],
        "metadata": {"n": number},
        **changes,
    }
