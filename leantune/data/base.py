"""What every reader returns and raises: `Row` (a row and where it came from) and `DataError` (bad data,
named by file and line). Its own module so that the optional columnar readers and the text readers share
them without importing each other."""
from __future__ import annotations

from dataclasses import dataclass


class DataError(ValueError):
    """Bad training data. The message names the file (and line), what is wrong and what to do; `line` is the
    line (or row) number when one is to blame, else 0."""

    def __init__(self, message: str, line: int = 0):
        super().__init__(message)
        self.line = line


@dataclass(frozen=True)
class Row:
    """One row of a data file: `n` is its line (`unit` "line") or its 1-based position (`unit` "row")."""

    data: dict
    source: str
    n: int
    unit: str = "line"

    @property
    def where(self) -> str:
        """How error messages name the row: `file:line` or `file row N`."""
        return f"{self.source}:{self.n}" if self.unit == "line" else f"{self.source} row {self.n}"
