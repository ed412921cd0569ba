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
