"""Reading and checking the previous knowledge store's export, one line at a time.

The export is JSON Lines: one entry an object, lines ended by ``\\n`` (``\\r\\n`` tolerated) and
by nothing else, so a U+2028 or a form feed inside a string stays inside its line. The file is
read in binary, a line at a time, with two caps that hold for pipes and devices as well as
files: a line may be at most :data:`MAX_LINE_BYTES`, the file at most :data:`MAX_EXPORT_BYTES`.
Past either cap reading stops at that line, so ``/dev/zero`` costs one megabyte, not the host.

Every value PostgreSQL would refuse is refused here first, with its line: NUL characters and
unpaired UTF-16 surrogates in any string, ``NaN``/``Infinity`` and numbers a double cannot hold,
integers too long to convert, nesting deeper than :data:`MAX_NESTING`. Problems are collected,
not raised one by one, so a broken export is fixed in one pass; past
:data:`MAX_SHOWN_PROBLEMS` they are counted rather than listed.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

MAX_LINE_BYTES = 1 << 20  # 1 MiB: the shipped entries are under 1 KiB
MAX_EXPORT_BYTES = 1 << 30  # 1 GiB: about 3 million entries of the shipped size
MAX_NESTING = 64  # levels of arrays and objects inside ``metadata``
# Python's default limit for converting an integer from text (sys.get_int_max_str_digits),
# written down so a changed interpreter setting cannot make the import accept or crash.
MAX_INT_DIGITS = 4300
MAX_SHOWN_PROBLEMS = 100
_SHOWN_VALUE = 60  # characters of a hostile value quoted back in a message

# field: (type allowed, longest text allowed, may be null)
_FIELDS: dict[str, tuple[type, int | None, bool]] = {
    "id": (str, 200, False),
    "agent": (str, 100, True),
    "category": (str, 100, False),
    "title": (str, 300, False),
    "content": (str, None, False),
    "source": (str, 500, False),
    "tags": (list, None, False),
    "metadata": (dict, None, False),
}
_FIELD_NAMES = frozenset(_FIELDS)
_REQUIRED_TEXT = tuple((name, longest) for name, (kind, longest, null) in _FIELDS.items()
                       if kind is str and not null)  # fmt: skip
_AGENT_LONGEST = _FIELDS["agent"][1] or 0
_TYPE_NAMES: dict[type, str] = {str: "string", list: "list", dict: "dict"}
# A NUL or a lone surrogate can only reach a decoded string through a \u escape: raw NUL is an
# invalid control character and raw surrogates are invalid UTF-8. Lines without one skip the scan.
_RISKY_ESCAPE = re.compile(r"\\u(?:0000|[dD][89abAB]|[dD][c-fC-F])")
_SURROGATE = re.compile("[\ud800-\udfff]")


class KnowledgeRecord(NamedTuple):
    line: int
    external_id: str
    agent: str | None
    category: str
    title: str
    content: str
    source: str
    tags: list[str]
    metadata: dict[str, Any]


class KnowledgeImportError(Exception):
    """The export is malformed; ``errors`` holds one ``FILE:LINE: reason`` per problem shown.

    ``total`` counts every problem found, including those past the shown ones.
    """

    def __init__(self, errors: list[str], total: int | None = None) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors
        self.total = len(errors) if total is None else total


class _BadNumber(ValueError):
    """Raised from inside ``json.loads``: a number this import refuses, and why."""


def _parse_int(text: str) -> int:
    digits = len(text) - text.startswith("-")
    if digits > MAX_INT_DIGITS:
        raise _BadNumber(f"an integer of {digits} digits (at most {MAX_INT_DIGITS})")
    try:
        return int(text)
    except ValueError:  # the interpreter's own limit is lower than ours
        raise _BadNumber(f"an integer of {digits} digits is too long to convert") from None


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _BadNumber(f"number {_shown(text)} is out of range for a double")
    return value


def _parse_constant(text: str) -> Any:
    raise _BadNumber(f"{text} is not a JSON number")


_DECODER = json.JSONDecoder(
    parse_int=_parse_int, parse_float=_parse_float, parse_constant=_parse_constant
)


def _shown(value: str) -> str:
    """``repr`` of a value from the file, shortened: control characters escaped, one line."""
    if len(value) > _SHOWN_VALUE:
        return repr(value[:_SHOWN_VALUE]) + f"... ({len(value)} characters)"
    return repr(value)


def _string_problems(value: str) -> list[str]:
    problems = []
    if "\x00" in value:
        problems.append("contains a NUL character")
    if _SURROGATE.search(value):
        problems.append("contains an unpaired UTF-16 surrogate, which is not text")
    return problems


def _nested_problems(name: str, value: Any, scan_strings: bool, check_depth: bool) -> list[str]:
    """What PostgreSQL would refuse anywhere inside a list or an object, each reason once."""
    found: dict[str, None] = {}
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if check_depth and depth > MAX_NESTING:
            found[f"is nested more than {MAX_NESTING} levels deep"] = None
            continue
        children = item.items() if isinstance(item, dict) else enumerate(item)
        for key, child in children:
            if scan_strings and isinstance(key, str):
                found.update(dict.fromkeys(_string_problems(key)))
            if isinstance(child, dict | list):
                stack.append((child, depth + 1))
            elif scan_strings and isinstance(child, str):
                found.update(dict.fromkeys(_string_problems(child)))
    return [f"field {name!r} {reason}" for reason in found]


def _is_clean(entry: Any) -> bool:
    """The common case, checked fast: exactly the fields, each of its type and size.

    Anything else goes through :func:`_entry_problems`, which says what is wrong.
    """
    if type(entry) is not dict or entry.keys() != _FIELD_NAMES:
        return False
    for name, longest in _REQUIRED_TEXT:
        value = entry[name]
        if type(value) is not str or not value or value.isspace():
            return False
        if longest is not None and len(value) > longest:
            return False
    agent = entry["agent"]
    if agent is not None and (
        type(agent) is not str or not agent or agent.isspace() or len(agent) > _AGENT_LONGEST
    ):
        return False
    tags = entry["tags"]
    if type(tags) is not list or type(entry["metadata"]) is not dict:
        return False
    return all(type(tag) is str and tag and not tag.isspace() for tag in tags)


def _entry_problems(entry: Any, scan_strings: bool, check_depth: bool) -> list[str]:
    if not isinstance(entry, dict):
        return [f"expected a JSON object, got {type(entry).__name__}"]
    problems = [f"missing field {name!r}" for name in _FIELDS if name not in entry]
    problems += [f"unknown field {_shown(name)}" for name in entry if name not in _FIELDS]
    for name, (kind, longest, nullable) in _FIELDS.items():
        value: Any = entry.get(name)
        if name not in entry or (value is None and nullable):
            continue
        if type(value) is not kind:
            problems.append(
                f"field {name!r} must be {_TYPE_NAMES[kind]}, got {type(value).__name__}"
            )
        elif isinstance(value, str):
            if not value.strip():
                problems.append(f"field {name!r} is empty")
            elif scan_strings and (reasons := _string_problems(value)):
                problems += [f"field {name!r} {reason}" for reason in reasons]
            elif longest is not None and len(value) > longest:
                problems.append(f"field {name!r} is longer than {longest} characters")
    tags = entry.get("tags")
    if isinstance(tags, list):
        if not all(isinstance(tag, str) and tag.strip() for tag in tags):
            problems.append("field 'tags' must be a list of non-empty strings")
        elif scan_strings:
            problems += _nested_problems("tags", tags, True, False)
    metadata = entry.get("metadata")
    if isinstance(metadata, dict) and (scan_strings or check_depth):
        problems += _nested_problems("metadata", metadata, scan_strings, check_depth)
    return problems


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
        return self.check_text(number, text)

    def check_text(self, number: int, text: str) -> KnowledgeRecord | None:
        """The record on this line, or ``None`` after noting its problems (or if it is blank)."""
        if not text.strip(" \t\r\n"):
            return None
        try:
            entry = _DECODER.decode(text)
        except _BadNumber as exc:
            self.problem(number, f"invalid JSON: {exc}")
            return None
        except json.JSONDecodeError as exc:
            self.problem(number, f"invalid JSON: {exc.msg} (column {exc.colno})")
            return None
        except RecursionError:
            self.problem(number, f"invalid JSON: nested more than {MAX_NESTING} levels deep")
            return None
        self.entries += 1
        scan_strings = "\\u" in text and _RISKY_ESCAPE.search(text) is not None
        check_depth = text.count("[") + text.count("{") > MAX_NESTING
        if scan_strings or check_depth or not _is_clean(entry):
            problems = _entry_problems(entry, scan_strings, check_depth)
        else:
            problems = []
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
            problems.append(f"unknown agent {_shown(agent)}")
        return problems


def duplicate_id(external_id: str, first: int) -> str:
    return f"duplicate id {_shown(external_id)} (first on line {first})"


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
