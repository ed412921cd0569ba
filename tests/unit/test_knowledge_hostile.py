"""Hostile knowledge exports, checked without a database: each is one ``FILE:LINE: reason``."""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
from pathlib import Path

import pytest

from db.seed.knowledge_entry import MAX_INT_DIGITS, MAX_NESTING
from db.seed.knowledge_export import (
    MAX_LINE_BYTES,
    MAX_SHOWN_PROBLEMS,
    parse_export,
    parse_lines,
)
from tests.knowledge_lines import GOOD, line

AGENTS = frozenset({"coder", "ops-sre"})


def nested(depth: int) -> object:
    value: object = "bottom"
    for level in range(depth):
        value = [value] if level % 2 else {"k": value}
    return value


def problems_of(text: str, path: str = "kb.jsonl") -> list[str]:
    parsed = parse_lines([line(id="kb-first"), text], Path(path), AGENTS)
    assert [r.external_id for r in parsed.records] == ["kb-first"], parsed.errors
    return parsed.errors


def assert_one_line_each(errors: list[str]) -> None:
    for error in errors:
        assert error.splitlines() == [error] and len(error) < 400, error
        assert "Traceback" not in error


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (line(tags=["ok", "a\x00b"]), "field 'tags' contains a NUL character"),
        (line(metadata={"note": "a\x00b"}), "field 'metadata' contains a NUL character"),
        (line(metadata={"ke\x00y": 1}), "field 'metadata' contains a NUL character"),
        (line(metadata={"deep": [{"x": ["\x00"]}]}), "field 'metadata' contains a NUL character"),
        (line(id="kb-\x00"), "field 'id' contains a NUL character"),
        (line(agent="co\x00der"), "field 'agent' contains a NUL character"),
    ],
)
def test_nul_anywhere_is_reported_with_its_field(text: str, reason: str) -> None:
    errors = problems_of(text)
    assert errors == [f"kb.jsonl:2: {reason}"]


@pytest.mark.parametrize("field", ["title", "content", "source", "category"])
def test_a_lone_surrogate_in_a_text_field_is_reported(field: str) -> None:
    text = line(**{field: "x"}).replace('"x"', '"bad \\ud800 here"')
    assert problems_of(text) == [
        f"kb.jsonl:2: field {field!r} contains an unpaired UTF-16 surrogate, which is not text"
    ]


@pytest.mark.parametrize(
    ("escaped", "field"),
    [
        ('"tags": ["\\udc00"]', "tags"),
        ('"metadata": {"k": "\\uDBFF"}', "metadata"),
        ('"metadata": {"\\ud83d": 1}', "metadata"),
    ],
)
def test_a_lone_surrogate_in_tags_or_metadata_is_reported(escaped: str, field: str) -> None:
    key = escaped.split(":")[0]
    entry = json.loads(line())
    text = ", ".join(
        escaped if f'"{name}"' == key else f"{json.dumps(name)}: {json.dumps(value)}"
        for name, value in entry.items()
    )
    errors = problems_of("{" + text + "}")
    assert errors == [
        f"kb.jsonl:2: field {field!r} contains an unpaired UTF-16 surrogate, which is not text"
    ]


def test_a_raw_lone_surrogate_in_already_decoded_text_is_reported() -> None:
    # parse_lines takes str: a surrogate can arrive raw, not only as a \u escape
    text = json.dumps({**GOOD, "title": "x"}, ensure_ascii=False).replace('"x"', '"raw \ud800"')
    assert "\\u" not in text
    assert problems_of(text) == [
        "kb.jsonl:2: field 'title' contains an unpaired UTF-16 surrogate, which is not text"
    ]


def test_a_surrogate_pair_is_text_and_accepted() -> None:
    text = line(title="x").replace('"x"', '"rocket \\ud83d\\ude80"')
    parsed = parse_lines([text], Path("kb.jsonl"))
    assert parsed.errors == [] and parsed.records[0].title == "rocket \U0001f680"


def test_integers_longer_than_python_converts_are_reported_not_raised() -> None:
    huge = "9" * (MAX_INT_DIGITS + 1)
    errors = problems_of(line(metadata={"n": 0}).replace('"n": 0', f'"n": -{huge}'))
    assert errors == [
        f"kb.jsonl:2: invalid JSON: an integer of {MAX_INT_DIGITS + 1} digits "
        f"(at most {MAX_INT_DIGITS})"
    ]
    fits = "9" * MAX_INT_DIGITS
    parsed = parse_lines([line(metadata={"n": 0}).replace('"n": 0', f'"n": {fits}')], Path("f"))
    assert parsed.errors == [] and parsed.records[0].metadata["n"] == int(fits)


@pytest.mark.parametrize(
    ("literal", "reason"),
    [
        ("NaN", "invalid JSON: NaN is not a JSON number"),
        ("Infinity", "invalid JSON: Infinity is not a JSON number"),
        ("-Infinity", "invalid JSON: -Infinity is not a JSON number"),
        ("1e400", "invalid JSON: number '1e400' is out of range for a double"),
        ("-2.5E+999", "invalid JSON: number '-2.5E+999' is out of range for a double"),
    ],
)
def test_numbers_jsonb_cannot_hold_are_reported(literal: str, reason: str) -> None:
    text = line(metadata={"score": 0}).replace('"score": 0', f'"score": {literal}')
    assert problems_of(text) == [f"kb.jsonl:2: {reason}"]


def test_metadata_nested_past_the_limit_is_reported_and_at_the_limit_accepted() -> None:
    # metadata itself is the first level
    at_limit = parse_lines([line(metadata={"k": nested(MAX_NESTING - 1)})], Path("f"))
    assert at_limit.errors == []
    errors = problems_of(line(metadata={"k": nested(MAX_NESTING)}))
    assert errors == [f"kb.jsonl:2: field 'metadata' is nested more than {MAX_NESTING} levels deep"]


def test_nesting_deeper_than_the_parser_recurses_is_reported_not_raised() -> None:
    depth = 200_000
    text = line(metadata={"k": 0}).replace('"k": 0', '"k": ' + "[" * depth + "]" * depth)
    assert problems_of(text) == [
        f"kb.jsonl:2: invalid JSON: nested more than {MAX_NESTING} levels deep"
    ]
    assert problems_of("[" * depth) == [
        f"kb.jsonl:2: invalid JSON: nested more than {MAX_NESTING} levels deep"
    ]


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\x85", "\u000b", "\u000c", "\u001c"])
def test_only_newline_ends_a_line(tmp_path: Path, separator: str) -> None:
    path = tmp_path / "kb.jsonl"
    first = line(id="kb-1", content=f"before{separator}after")
    raw = first.replace(json.dumps(f"before{separator}after"), f'"before{separator}after"')
    path.write_bytes(raw.encode() + b"\r\n" + line(id="kb-2").encode() + b"\n")
    parsed = parse_export(path)
    if separator < " ":
        # A raw control character inside a JSON string is invalid JSON, on its own line 1.
        assert [e.split(": ")[0] for e in parsed.errors] == [f"{path}:1"]
        assert "Invalid control character" in parsed.errors[0]
    else:
        assert parsed.errors == []
        assert parsed.records[0].content == f"before{separator}after"
    assert parsed.records[-1].external_id == "kb-2" and parsed.records[-1].line == 2


def test_unknown_agents_are_reported_in_the_same_pass_as_other_problems() -> None:
    parsed = parse_lines(
        [line(id="a", agent="nobody"), "{oops", line(id="b"), line(id="c", agent="ghost")],
        Path("kb.jsonl"),
        AGENTS,
    )
    assert parsed.errors[0] == "kb.jsonl:1: unknown agent 'nobody'"
    assert parsed.errors[1].startswith("kb.jsonl:2: invalid JSON")
    assert parsed.errors[2] == "kb.jsonl:4: unknown agent 'ghost'"
    assert [r.external_id for r in parsed.records] == ["b"]


def test_problems_past_the_cap_are_counted_not_listed() -> None:
    bad = 250
    parsed = parse_lines(
        [line(id=f"kb-{n}", agent="nobody") for n in range(bad)], Path("f"), AGENTS
    )
    assert len(parsed.errors) == MAX_SHOWN_PROBLEMS + 1
    assert parsed.errors[-1] == f"f: and {bad - MAX_SHOWN_PROBLEMS} more"
    assert (
        parsed.errors[MAX_SHOWN_PROBLEMS - 1] == f"f:{MAX_SHOWN_PROBLEMS}: unknown agent 'nobody'"
    )


def test_hostile_values_are_quoted_back_escaped_and_short() -> None:
    name = "evil\nINFO forged log line\u2028" + "x" * 5000
    errors = problems_of(line(**{name: 1}, agent="ghost\x1b[31m"))
    assert_one_line_each(errors)
    assert errors[0].startswith("kb.jsonl:2: unknown field 'evil\\nINFO forged log line\\u2028")
    assert "... (5026 characters)" in errors[0]
    errors = problems_of(line(agent="ghost\x1b[31m"))
    assert errors == ["kb.jsonl:2: unknown agent 'ghost\\x1b[31m'"]


def test_reading_dev_zero_stops_at_the_line_cap(tmp_path: Path) -> None:
    started = time.monotonic()
    parsed = parse_export(Path("/dev/zero"))
    assert parsed.errors == [
        f"/dev/zero:1: line longer than {MAX_LINE_BYTES} bytes; stopped reading"
    ]
    assert time.monotonic() - started < 10


def test_a_line_at_the_cap_is_read_and_one_byte_more_is_not(tmp_path: Path) -> None:
    path = tmp_path / "kb.jsonl"
    exact = line(content="x")
    padded = exact.replace('"x"', '"' + "x" * (200 - len(exact) + 1) + '"')
    assert len(padded) == 200
    path.write_text(padded + "\n" + line(id="kb-2", content="y" * 300) + "\n")
    parsed = parse_export(path, max_line_bytes=200)
    assert [r.line for r in parsed.records] == [1]
    assert parsed.errors == [f"{path}:2: line longer than 200 bytes; stopped reading"]


def test_a_regular_file_over_the_size_cap_is_refused_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "kb.jsonl"
    path.write_text("\n".join(line(id=f"kb-{n}") for n in range(20)) + "\n")
    size = path.stat().st_size
    parsed = parse_export(path, max_bytes=size - 1)
    assert parsed.records == []
    assert parsed.errors == [
        f"{path}:0: the file has {size} bytes; an export may have at most {size - 1}"
    ]


def test_an_endless_pipe_stops_at_the_size_cap(tmp_path: Path) -> None:
    fifo = tmp_path / "kb.fifo"
    os.mkfifo(fifo)

    def write_forever() -> None:
        try:
            with fifo.open("wb") as sink:
                for number in itertools.count(1):
                    sink.write((line(id=f"kb-{number:09d}") + "\n").encode())
        except BrokenPipeError:
            pass

    writer = threading.Thread(target=write_forever, daemon=True)
    writer.start()
    parsed = parse_export(fifo, max_bytes=100_000)
    writer.join(timeout=10)
    assert not writer.is_alive()
    per_line = len(line(id="kb-000000001")) + 1
    stopped_at = 100_000 // per_line + 1
    assert parsed.errors == [
        f"{fifo}:{stopped_at}: more than 100000 bytes in the file; stopped reading"
    ]
    assert len(parsed.records) == stopped_at - 1


def test_a_directory_is_a_clear_error(tmp_path: Path) -> None:
    assert parse_export(tmp_path).errors == [f"{tmp_path}:0: cannot read: Is a directory"]


def test_invalid_utf8_is_reported_per_line_and_the_rest_still_checked(tmp_path: Path) -> None:
    path = tmp_path / "kb.jsonl"
    path.write_bytes(
        line(id="kb-1").encode()
        + b"\n"
        + b'{"id": "\xed\xa0\x80"}\n'  # an encoded surrogate: not UTF-8
        + line(id="kb-3", title="").encode()
        + b"\n"
    )
    assert parse_export(path).errors == [
        f"{path}:2: not UTF-8 text",
        f"{path}:3: field 'title' is empty",
    ]
