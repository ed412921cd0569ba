"""The migration graph, read from the revision files' headers without importing Alembic.

The sidecar's ``/readyz`` needs only the head revision's id. Alembic's ``ScriptDirectory``
imports Alembic, Mako and every revision module to find it, about 10 MB of resident memory in a
process that stays up for months; the two assignments at the top of each file say the same.
``db.migrate.head_revision`` (Alembic's answer) is tested to agree.
"""

from __future__ import annotations

import ast
from pathlib import Path

VERSIONS_DIR = Path(__file__).resolve().parent / "migrations" / "versions"


class RevisionGraphError(Exception):
    """The revision files do not form one line of history with a single head."""


def _header(path: Path) -> tuple[str, tuple[str, ...]]:
    """``revision`` and its ``down_revision`` ids, from the module's top-level assignments."""
    values: dict[str, object] = {}
    for node in ast.parse(path.read_text(encoding="utf-8"), str(path)).body:
        target, value = None, None
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            target, value = node.target.id, node.value
        elif (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
        ):
            target, value = node.targets[0].id, node.value
        if target in ("revision", "down_revision") and value is not None:
            values[target] = ast.literal_eval(value)
    revision, down = values.get("revision"), values.get("down_revision")
    if not isinstance(revision, str):
        raise RevisionGraphError(f"{path.name}: no literal `revision` id")
    if down is None:
        return revision, ()
    downs = (down,) if isinstance(down, str) else down
    if not isinstance(downs, tuple | list) or not all(isinstance(d, str) for d in downs):
        raise RevisionGraphError(f"{path.name}: `down_revision` is not an id or ids")
    return revision, tuple(downs)


def head_revision(directory: Path = VERSIONS_DIR) -> str:
    """The one revision no other revision builds on."""
    graph = dict(_header(path) for path in sorted(directory.glob("*.py")))
    if not graph:
        raise RevisionGraphError(f"no revisions in {directory}")
    parents = {down for downs in graph.values() for down in downs}
    heads = sorted(set(graph) - parents)
    if len(heads) != 1:
        raise RevisionGraphError(f"expected one head revision, found {heads or 'none'}")
    return heads[0]
