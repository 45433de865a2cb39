"""The corpus used when `model.data.data_prefix` is empty: the text of Python's own
documentation topics (the standard library's `pydoc_data`), so the quickstart needs no
download. Paragraphs are joined into lines of about `line_chars` characters, one document
per line, in the `text_mmap` format. Lines are shuffled (fixed seed) so the contiguous
train/valid/test splits of `splits_string` each sample every topic, rather than the valid
split holding only the alphabetically last ones.
"""
from __future__ import annotations

import random
import re
from pathlib import Path

from mega.checkpoint.atomic import atomic_write_text


def write_pydoc_corpus(path: Path, line_chars: int = 450) -> Path:
    if path.is_file() and path.stat().st_size > 0:
        return path
    from pydoc_data.topics import topics

    lines, current = [], ""
    for name in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[name]):
            para = " ".join(para.split())
            if not para:
                continue
            current = f"{current} {para}" if current else para
            if len(current) >= line_chars:
                lines.append(current)
                current = ""
    if current:
        lines.append(current)
    random.Random(1234).shuffle(lines)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
