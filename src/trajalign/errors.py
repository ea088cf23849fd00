"""Errors meant for people: one line saying what went wrong and where."""

from __future__ import annotations


class TrajalignError(Exception):
    """A user-facing error. The CLI prints it on one line and exits with `exit_code`."""

    exit_code = 2


class InputError(TrajalignError):
    """Bad input: a file, row, field, option or model spec that cannot be used."""


def where(path: object, row: int | None = None, field: str | None = None) -> str:
    """Format a location as `file:row field` for error messages (rows count from 1, header excluded)."""
    location = str(path)
    if row is not None:
        location += f" row {row}"
    if field is not None:
        location += f" field '{field}'"
    return location
