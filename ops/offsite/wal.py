"""WAL file names as the off-host sequence sees them: order, segment numbers, gaps (pure).

A segment name is ``TTTTTTTTXXXXXXXXYYYYYYYY``: timeline, then the segment number split in
two 32-bit halves (``XXXXXXXX * 256 + YYYYYYYY`` for 16 MB segments). History files
(``TTTTTTTT.history``) open a timeline. Anything else under the store's ``wals/`` is not ours
to interpret: a stray object or a temporary upload never counts as a segment.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import pairwise

SEGMENT = re.compile(r"^([0-9A-F]{8})([0-9A-F]{8})([0-9A-F]{8})$")
HISTORY = re.compile(r"^([0-9A-F]{8})\.history$")
# What Barman Cloud appends to a compressed object's name.
_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".snappy", ".zst", ".lz4")
SEGMENTS_PER_LOG = 256  # 0x100000000 / 16 MB


def is_wal_name(name: str) -> bool:
    return bool(SEGMENT.match(name) or HISTORY.match(name))


def sort_key(name: str) -> tuple[int, int, int]:
    """Shipping order: by timeline, a history file before its timeline's segments, then by
    segment number."""
    if match := HISTORY.match(name):
        return (int(match.group(1), 16), 0, 0)
    match = SEGMENT.match(name)
    if match is None:
        raise ValueError(f"not a WAL file name: {name!r}")
    return (int(match.group(1), 16), 1, segment_number(name))


def segment_number(name: str) -> int:
    match = SEGMENT.match(name)
    if match is None:
        raise ValueError(f"not a WAL segment name: {name!r}")
    return int(match.group(2), 16) * SEGMENTS_PER_LOG + int(match.group(3), 16)


def segment_name(timeline: int, number: int) -> str:
    log, seg = divmod(number, SEGMENTS_PER_LOG)
    return f"{timeline:08X}{log:08X}{seg:08X}"


def name_of_object(key: str) -> str | None:
    """The WAL name of an object under ``…/wals/``, or None for anything that is not a whole
    WAL object Barman Cloud would write (a stray, a ``.partial``, a temporary name)."""
    base = key.rsplit("/", 1)[-1]
    for suffix in _COMPRESSION_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    if SEGMENT.match(base):
        hash_dir = key.rsplit("/", 2)[-2] if key.count("/") >= 1 else ""
        return base if hash_dir == base[:16] else None
    return base if HISTORY.match(base) else None


@dataclass(frozen=True)
class Gap:
    """Segments missing between two that are present, on one timeline."""

    first_missing: str
    last_missing: str
    count: int

    def __str__(self) -> str:
        if self.count == 1:
            return f"WAL {self.first_missing} is missing"
        return f"WAL {self.first_missing}..{self.last_missing} ({self.count} segments) missing"


def gaps(names: Iterable[str], since: str | None = None) -> list[Gap]:
    """Holes in a sequence of segment names, per timeline, from ``since`` (the oldest segment
    recovery needs: older ones may be gone by retention) to the newest present."""
    by_timeline: dict[int, set[int]] = {}
    for name in names:
        if SEGMENT.match(name):
            by_timeline.setdefault(int(name[:8], 16), set()).add(segment_number(name))
    floor = sort_key(since) if since is not None and SEGMENT.match(since) else None
    found: list[Gap] = []
    for timeline in sorted(by_timeline):
        numbers = sorted(by_timeline[timeline])
        if floor is not None:
            if timeline < floor[0]:
                continue
            if timeline == floor[0]:
                numbers = [n for n in numbers if n >= floor[2]]
        for before, after in pairwise(numbers):
            if after - before > 1:
                found.append(
                    Gap(
                        segment_name(timeline, before + 1),
                        segment_name(timeline, after - 1),
                        after - before - 1,
                    )
                )
    return found


def missing_count(found: Iterable[Gap]) -> int:
    return sum(gap.count for gap in found)
