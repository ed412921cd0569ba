"""What of an archive a role can restore: the table of contents, less what needs a superuser.

The sidecar restores (and drills) as the backup role, which is not a superuser. A dump of the
stack's database holds entries only a superuser can replay: an untrusted extension such as
pg_stat_statements (and the comment on it), default privileges set for another role, and
grants on system functions. Left in,
each is an error and the restore counts as failed although every table and row came back. They
are taken out of the list handed to ``pg_restore --use-list`` and named in a warning, so the
operator knows what a superuser restore would add.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Collection
from dataclasses import dataclass, field

from sqlalchemy import text
from sqlalchemy.engine import Connection

from ops.backup.pgtools import ClientTool, ToolError, first_error_line

# "<dump id>; <catalog oid> <object oid> <description> <schema> <name> <owner>"
_ENTRY = re.compile(r"^\d+; \d+ \d+ (?P<rest>.*)$")
_EXTENSION = re.compile(r"^EXTENSION - (?P<name>\S+)")
_EXTENSION_COMMENT = re.compile(r"^COMMENT - EXTENSION (?P<name>\S+)")

TRUSTED_EXTENSIONS_SQL = text(
    "SELECT DISTINCT name FROM pg_available_extension_versions WHERE trusted"
)
SUPERUSER_SQL = text("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")


@dataclass
class RestoreList:
    """The entries to restore (``pg_restore --use-list`` input) and what was left out."""

    listing: str
    entries: int
    skipped: list[str] = field(default_factory=list)


def read_toc(tool: ClientTool, archive: str) -> str:
    """``pg_restore --list`` of ``archive``; a :class:`ToolError` when it cannot be read."""
    listed = subprocess.run(
        [tool.path, "--list", archive], capture_output=True, text=True, check=False
    )
    if listed.returncode != 0:
        raise ToolError(
            f"pg_restore --list cannot read {archive}: {first_error_line(listed.stderr)}"
        )
    return listed.stdout


def restorable(toc: str, *, superuser: bool, trusted_extensions: Collection[str]) -> RestoreList:
    """``toc`` less the entries only a superuser can restore (all of it for a superuser)."""
    kept: list[str] = []
    skipped: list[str] = []
    entries = 0
    for line in toc.splitlines():
        match = _ENTRY.match(line)
        if match is None:  # comments and blank lines
            kept.append(line)
            continue
        rest = match.group("rest").strip()
        if not superuser and _needs_superuser(rest, trusted_extensions):
            skipped.append(rest)
            kept.append(f";{line}")
            continue
        kept.append(line)
        entries += 1
    return RestoreList("\n".join(kept) + "\n", entries, skipped)


def _needs_superuser(entry: str, trusted_extensions: Collection[str]) -> bool:
    for pattern in (_EXTENSION, _EXTENSION_COMMENT):
        if (found := pattern.match(entry)) is not None:
            return found.group("name") not in trusted_extensions
    # ALTER DEFAULT PRIVILEGES FOR ROLE <owner>: only that role's members or a superuser;
    # grants on system functions (the backup role's pg_backup_start, pg_switch_wal, for PITR)
    # belong to their owner, the bootstrap superuser.
    return entry.startswith(("DEFAULT ACL ", "ACL pg_catalog "))


def restore_rights(connection: Connection) -> tuple[bool, set[str]]:
    """Whether the connected role is a superuser, and which extensions it may create anyway."""
    superuser = bool(connection.execute(SUPERUSER_SQL).scalar())
    trusted = {str(name) for name in connection.execute(TRUSTED_EXTENSIONS_SQL).scalars()}
    return superuser, trusted
