"""One line of the knowledge export: is it an entry, and would PostgreSQL take every value?

Every value PostgreSQL would refuse is refused here first: NUL characters and unpaired UTF-16
surrogates in any string, ``NaN``/``Infinity`` and numbers a double cannot hold, integers too
long to convert, nesting deeper than :data:`MAX_NESTING`. The common case, a clean entry, is
checked by a fast path; the rest are explained field by field.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, NamedTuple

MAX_NESTING = 64  # levels of arrays and objects inside ``metadata``
# Python's default limit for converting an integer from text (sys.get_int_max_str_digits),
# written down so a changed interpreter setting cannot make the import accept or crash.
MAX_INT_DIGITS = 4300
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
# In text decoded from UTF-8, a NUL or a lone surrogate can only come from a \u escape: raw NUL
# is an invalid control character and raw surrogates are invalid UTF-8. Lines without one skip
# the scan of every string.
_RISKY_ESCAPE = re.compile(r"\\u(?:0000|[dD][89a-fA-F])")
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
        raise _BadNumber(f"number {quoted(text)} is out of range for a double")
    return value


def _parse_constant(text: str) -> Any:
    raise _BadNumber(f"{text} is not a JSON number")


_DECODER = json.JSONDecoder(
    parse_int=_parse_int, parse_float=_parse_float, parse_constant=_parse_constant
)


def quoted(value: str) -> str:
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
    problems += [f"unknown field {quoted(name)}" for name in entry if name not in _FIELDS]
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


def parse_entry(text: str, decoded: bool = False) -> tuple[dict[str, Any] | None, list[str]]:
    """The entry on one line and its problems; ``None`` if the line is not a JSON entry at all.

    ``decoded``: ``text`` came from UTF-8 bytes, so a surrogate can only be a ``\\u`` escape.
    """
    try:
        entry = _DECODER.decode(text)
    except _BadNumber as exc:
        return None, [f"invalid JSON: {exc}"]
    except json.JSONDecodeError as exc:
        return None, [f"invalid JSON: {exc.msg} (column {exc.colno})"]
    except RecursionError:
        return None, [f"invalid JSON: nested more than {MAX_NESTING} levels deep"]
    if not isinstance(entry, dict):
        return None, [f"expected a JSON object, got {type(entry).__name__}"]
    scan_strings = ("\\u" in text and _RISKY_ESCAPE.search(text) is not None) or (
        not decoded and _SURROGATE.search(text) is not None
    )
    check_depth = text.count("[") + text.count("{") > MAX_NESTING
    if scan_strings or check_depth or not _is_clean(entry):
        return entry, _entry_problems(entry, scan_strings, check_depth)
    return entry, []
