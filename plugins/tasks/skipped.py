"""The records a reader leaves out, reported rather than dropped without a word.

Readers keep the reference implementations' rules about what they skip (NeMo's text
classification skips a line whose last field is not an integer label; BERT's and NeMo's
SQuAD readers skip a training answer whose text is not where `answer_start` says). Each
skipped record is named in the log with its file and line (or question id) and what is
wrong -- the first few of a file one by one, then how many in all -- so a file that loses
records to a wrong delimiter or a shifted column says so before anything trains.
"""
from __future__ import annotations

import logging
from typing import List, Tuple

log = logging.getLogger("mega")

SHOWN = 5  # records named one by one per file; the rest are counted


class Skipped:
    """What one file's reader skipped: `add(where, why)` per record, `report(kept)` once."""

    def __init__(self, path, unit: str = "lines"):
        self.path, self.unit = path, unit
        self.records: List[Tuple[str, str]] = []

    def add(self, where: str, why: str) -> None:
        """`where`: the record's place (`file:line`, `file: question 'id'`); `why`: what is wrong."""
        self.records.append((where, why))
        if len(self.records) <= SHOWN:
            log.warning("%s: %s; skipped", where, why)

    def report(self, kept: int) -> None:
        """The count, after the file is read (nothing when nothing was skipped)."""
        n = len(self.records)
        if n:
            more = f"; {n - SHOWN} more not shown" if n > SHOWN else ""
            log.warning("%s: %d of %d %s skipped%s", self.path, n, n + kept, self.unit, more)

    def __len__(self) -> int:
        return len(self.records)
