"""Reading and checking the previous knowledge store's export, one line at a time.

The export is JSON Lines: one entry an object, lines ended by ``\\n`` (``\\r\\n`` tolerated) and
by nothing else, so a U+2028 or a form feed inside a string stays inside its line. The file is
read in binary, a line at a time, with two caps that hold for pipes and devices as well as
files: a line may be at most :data:`MAX_LINE_BYTES`, the file at most :data:`MAX_EXPORT_BYTES`.
Past either cap reading stops at that line, so ``/dev/zero`` costs one megabyte, not the host.

Each line is checked by :mod:`db.seed.knowledge_entry`. Problems are collected with their line,
not raised one by one, so a broken export is fixed in one pass; past
:data:`MAX_SHOWN_PROBLEMS` they are counted rather than listed.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from db.seed.knowledge_entry import KnowledgeRecord, parse_entry, quoted

MAX_LINE_BYTES = 1 << 20  # 1 MiB: the shipped entries are under 1 KiB
MAX_EXPORT_BYTES = 1 << 30  # 1 GiB: about 3 million entries of the shipped size
MAX_SHOWN_PROBLEMS = 100


class KnowledgeImportError(Exception):
    """The export is malformed; ``errors`` holds one ``FILE:LINE: reason`` per problem shown.

    ``total`` counts every problem found, including those past the shown ones.
    """

    def __init__(self, errors: list[str], total: int | None = None) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors
        self.total = len(errors) if total is None else total


@dataclass
class ExportChecker:
    """Checks an export line by line and keeps what an operator needs to fix it.

    ``known_agents``: the agent names that exist; ``None`` leaves agents unchecked (no database).
    ``find_duplicates``: remember every id to report repeats; the import turns it off and asks
    the database instead, so memory does not grow with the file.
    """

    path: Path
    known_agents: Collection[str] | None = None
    find_duplicates: bool = True
    shown: list[tuple[int, str]] = field(default_factory=list)  # (line, reason), in line order
    total: int = 0
    entries: int = 0
    _first_seen: dict[str, int] = field(default_factory=dict, repr=False)

    def problem(self, number: int, reason: str) -> None:
        self.total += 1
        if len(self.shown) < MAX_SHOWN_PROBLEMS:
            self.shown.append((number, reason))

    def add_problems(self, found: Iterable[tuple[int, str]], count: int) -> None:
        """Problems found after the pass (in line order, ``count`` of them), merged by line."""
        self.shown = sorted([*self.shown, *found], key=lambda item: item[0])[:MAX_SHOWN_PROBLEMS]
        self.total += count

    @property
    def errors(self) -> list[str]:
        hidden = self.total - len(self.shown)
        shown = [f"{self.path}:{number}: {reason}" for number, reason in self.shown]
        return shown + ([f"{self.path}: and {hidden} more"] if hidden else [])

    def error(self) -> KnowledgeImportError:
        return KnowledgeImportError(self.errors, self.total)

    def finish(self) -> None:
        if not self.entries and not self.total:
            self.problem(0, "no entries in the file")

    def check_bytes(self, number: int, raw: bytes) -> KnowledgeRecord | None:
        if raw.endswith(b"\n"):
            raw = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
        if not raw.strip(b" \t\r"):
            return None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            self.problem(number, "not UTF-8 text")
            return None
        return self.check_text(number, text, decoded=True)

    def check_text(self, number: int, text: str, decoded: bool = False) -> KnowledgeRecord | None:
        """The record on this line, or ``None`` after noting its problems (or if it is blank).

        ``decoded``: ``text`` came from UTF-8 bytes, so it holds no raw surrogate.
        """
        if not text.strip(" \t\r\n"):
            return None
        entry, problems = parse_entry(text, decoded)
        if entry is None:
            self.problem(number, problems[0])
            return None
        self.entries += 1
        if not problems:
            problems = self._relation_problems(number, entry)
        if problems:
            for problem in problems:
                self.problem(number, problem)
            return None
        return KnowledgeRecord(
            number,
            entry["id"],
            entry["agent"],
            entry["category"],
            entry["title"],
            entry["content"],
            entry["source"],
            entry["tags"],
            entry["metadata"],
        )

    def _relation_problems(self, number: int, entry: dict[str, Any]) -> list[str]:
        problems = []
        external_id, agent = entry["id"], entry["agent"]
        if self.find_duplicates:
            first = self._first_seen.setdefault(external_id, number)
            if first != number:
                problems.append(duplicate_id(external_id, first))
        if agent is not None and self.known_agents is not None and agent not in self.known_agents:
            problems.append(f"unknown agent {quoted(agent)}")
        return problems


def duplicate_id(external_id: str, first: int) -> str:
    return f"duplicate id {quoted(external_id)} (first on line {first})"


def read_lines(
    path: Path,
    checker: ExportChecker,
    *,
    max_bytes: int = MAX_EXPORT_BYTES,
    max_line_bytes: int = MAX_LINE_BYTES,
) -> Iterator[tuple[int, bytes]]:
    """``(number, line)`` for each line of ``path``, within the caps; problems go to ``checker``.

    Any readable file is accepted: a regular file larger than ``max_bytes`` is refused before
    reading, and a pipe or a device is read until a cap is reached or it ends.
    """
    try:
        source = path.open("rb")
    except OSError as exc:
        checker.problem(0, f"cannot read: {exc.strerror or exc}")
        return
    with source:
        size = os.fstat(source.fileno())
        if stat.S_ISREG(size.st_mode) and size.st_size > max_bytes:
            checker.problem(
                0, f"the file has {size.st_size} bytes; an export may have at most {max_bytes}"
            )
            return
        number = read = 0
        while True:
            try:
                raw = source.readline(max_line_bytes + 1)
            except OSError as exc:
                checker.problem(number + 1, f"cannot read: {exc.strerror or exc}")
                return
            if not raw:
                return
            number += 1
            read += len(raw)
            if read > max_bytes:
                checker.problem(number, f"more than {max_bytes} bytes in the file; stopped reading")
                return
            if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
                checker.problem(number, f"line longer than {max_line_bytes} bytes; stopped reading")
                return
            yield number, raw


def records(
    lines: Iterable[tuple[int, bytes]], checker: ExportChecker
) -> Iterator[KnowledgeRecord]:
    """The good records of ``lines``; every problem is left in ``checker``."""
    for number, raw in lines:
        record = checker.check_bytes(number, raw)
        if record is not None:
            yield record
    checker.finish()


@dataclass
class ParsedExport:
    path: Path
    records: list[KnowledgeRecord] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def parse_lines(
    lines: Iterable[str], path: Path, known_agents: Collection[str] | None = None
) -> ParsedExport:
    """Check every line (already split, without its ``\\n``); keep the good records."""
    checker = ExportChecker(path, known_agents)
    parsed = ParsedExport(path)
    for number, text in enumerate(lines, start=1):
        record = checker.check_text(number, text)
        if record is not None:
            parsed.records.append(record)
    checker.finish()
    parsed.errors = checker.errors
    return parsed


def parse_export(
    path: Path,
    known_agents: Collection[str] | None = None,
    *,
    max_bytes: int = MAX_EXPORT_BYTES,
    max_line_bytes: int = MAX_LINE_BYTES,
) -> ParsedExport:
    """The whole export in memory: for checks and small files. ``import_knowledge`` streams."""
    checker = ExportChecker(path, known_agents)
    lines = read_lines(path, checker, max_bytes=max_bytes, max_line_bytes=max_line_bytes)
    parsed = ParsedExport(path, list(records(lines, checker)))
    parsed.errors = checker.errors
    return parsed
