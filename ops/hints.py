"""Commands and options named the way the user typed them.

``make restore ID=… FORCE=1`` runs ``ops backup restore … --force`` in the sidecar; a message
that says "use --force" sends a ``make`` user looking for an option they never typed.
docker/stack.py sets ``OPS_HINTS=make`` for the commands it runs, and messages that name a
command or an option ask this module how to spell it.
"""

from __future__ import annotations

import os

# ops spelling -> make spelling (the targets and variables in the Makefile)
MAKE_SPELLING = {
    "ops backup list": "make backups",
    "ops backup list --offsite": "make backups FROM=offsite",
    "ops backup run": "make backup",
    "ops backup verify --drill": "make verify DRILL=1",
    "ops backup restore": "make restore",
    "--force": "FORCE=1",
    "--target-db": "TARGET_DB",
    "--replace-live": "REPLACE_LIVE=1",
    "--allow-postgres-db": "ALLOW_POSTGRES_DB=1",
    "--from offsite": "FROM=offsite",
}


def via_make() -> bool:
    return os.environ.get("OPS_HINTS", "").lower() == "make"


def spell(ops_spelling: str) -> str:
    """``ops_spelling`` as the user's interface names it (unchanged outside ``make``)."""
    if via_make():
        return MAKE_SPELLING.get(ops_spelling, ops_spelling)
    return ops_spelling
