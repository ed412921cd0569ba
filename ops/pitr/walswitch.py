"""The forced WAL switch: close the current segment every ``PITR_ARCHIVE_TIMEOUT``, but only
when something was written since the last switch.

Streaming hands over a segment once it is complete (and Barman archives it once the next one
has begun); on a quiet server that can take hours,
and the archive (what a recovery can use) would trail by as much. Switching an idle server
would instead fill the archive with empty 16 MB segments, hence the comparison.
"""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.engine import Engine

LSN = text("SELECT pg_current_wal_insert_lsn()::text")


def needs_switch(current_lsn: str, last_switch_lsn: str | None) -> bool:
    """Whether WAL was written since the last switch (``None``: no switch seen yet)."""
    return last_switch_lsn is None or current_lsn != last_switch_lsn


class WalSwitcher:
    """Remembers where the last switch left the WAL, and switches only past it."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.last_switch_lsn: str | None = None
        self.switches = 0

    def tick(self) -> bool:
        """Switch if needed; whether a segment was closed.

        Positions are insert positions: with asynchronous commit a commit can still sit in the
        WAL buffers, where the write position (``pg_current_wal_lsn``) does not see it yet.
        """
        with self.engine.connect() as connection:
            current = connection.execute(LSN).scalar_one()
            if not needs_switch(current, self.last_switch_lsn):
                return False
            # pg_switch_wal() does nothing when the segment in use is still empty.
            connection.execute(text("SELECT pg_switch_wal()"))
            after = connection.execute(LSN).scalar_one()
            connection.commit()
            closed = bool(after != current)
            if closed:
                # Barman archives a streamed segment only once the next one has begun, and
                # on an idle server nothing would begin it: one commit record does.
                connection.execute(text("SELECT txid_current()"))
                connection.commit()
                after = connection.execute(LSN).scalar_one()
                connection.commit()
        self.last_switch_lsn = after
        if closed:
            self.switches += 1
        return closed
