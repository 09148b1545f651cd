"""One error type for bad input, always naming where the problem is."""

from __future__ import annotations


class DataError(ValueError):
    """Bad input data. ``where`` names the file (and row, mask, ...); ``problem`` says what is wrong."""

    def __init__(self, where: str, problem: str):
        self.where, self.problem = str(where), problem
        super().__init__(f"{where}: {problem}")
