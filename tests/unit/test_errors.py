"""What an operator reads of an error: its first line, even when the error says nothing."""

from __future__ import annotations

import psycopg2
from sqlalchemy.exc import OperationalError

from db.errors import error_line


def test_error_line_takes_the_drivers_first_line_without_statement_or_detail() -> None:
    driver = psycopg2.OperationalError('FATAL:  database "x" does not exist\nDETAIL: more')
    wrapped = OperationalError("SELECT 1", {}, driver)
    assert error_line(wrapped) == 'FATAL:  database "x" does not exist'


def test_error_line_of_an_empty_message_names_the_error_type() -> None:
    assert error_line(RuntimeError("")) == "RuntimeError"
    assert error_line(OperationalError("SELECT 1", {}, psycopg2.OperationalError(""))) == (
        "OperationalError"
    )
