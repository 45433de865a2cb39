"""Multiple choice (RACE, SWAG) -> one sample of `num_choices` rows per question.

* **RACE** (Megatron-LM's `tasks/race`): a `.txt` (or `.jsonl`) file per article, one JSON
  object per line: `{"article": str, "questions": [str], "options": [[str, ...]],
  "answers": ["A".."D"], "id": str}`; a directory is read recursively (`train/high/*.txt`...).
  The article is cleaned (newlines to spaces, whitespace collapsed, " . " -> ". " three
  times). Each option's text is the question with `_` replaced by the option when the
  question has a blank, else `question + " " + option`, cleaned and cut to 128 tokens.
  A row is `[CLS] qa [SEP] article [SEP]` (token types 0 then 1), cut to the sequence length.
* **SWAG** (CSV with a header): columns `sent1`, `sent2`, `ending0..ending3`, `label`
  (others ignored). A row is `[CLS] sent1 [SEP] sent2 ending_i [SEP]`, the second part cut;
  a row with an empty ending is skipped and reported.

The label is the correct option's index; the metric is accuracy of the argmax over choices.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Dict, List, Sequence, Tuple, Union

import torch

from mega.errors import DataError
from mega.plugins.tasks.skipped import Skipped
from mega.plugins.tasks.subwords import Subwords

MAX_QA_LENGTH = 128


def clean_text(text: str) -> str:
    text = " ".join(text.replace("\n", " ").split())
    for _ in range(3):
        text = text.replace(" . ", ". ")
    return text


# (first segment per choice, second segment: one string shared by the choices or one per choice, label)
MCExample = Tuple[List[str], Union[str, List[str]], int]


def _race_files(path: Path) -> List[Path]:
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".txt", ".jsonl", ".json"))
    if path.is_file():
        return [path]
    raise DataError(f"{path}: RACE file or directory not found")


def read_race(path) -> List[MCExample]:
    """([qa text per option], article, label) per question."""
    out = []
    for file in _race_files(Path(path)):
        for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                article = clean_text(d["article"])
                for q, options, answer in zip(d["questions"], d["options"], d["answers"]):
                    label = ord(answer) - ord("A")
                    if not 0 <= label < len(options):
                        raise DataError(f"{file}:{n}: answer {answer!r} does not name one of {len(options)} options")
                    qas = [clean_text(q.replace("_", o) if "_" in q else f"{q} {o}") for o in options]
                    out.append((qas, article, label))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DataError(f"{file}:{n}: not a RACE line ({e})") from None
    if not out:
        raise DataError(f"{path}: no RACE questions")
    return out


SWAG_ENDINGS = ("ending0", "ending1", "ending2", "ending3")


def read_swag(path) -> List[MCExample]:
    """([sent1 per option], ["sent2 ending_i" per option], label) per row.

    The header must name `sent1`, `sent2`, `ending0`..`ending3` and `label`; a row with
    another number of fields than the header, or a label that is not an integer naming one
    of the endings, is a DataError naming its line. A row with an empty ending is skipped
    and reported (mega.plugins.tasks.skipped): it is not a four-way question."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: SWAG csv not found")
    out = []
    skipped = Skipped(path, "rows")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in ("sent1", "sent2", *SWAG_ENDINGS, "label") if c not in header]
        if missing:
            raise DataError(f"{path}: the SWAG header lacks {', '.join(missing)} (it needs sent1, sent2, "
                            f"ending0..ending3 and label; it has {', '.join(header) or 'nothing'})")
        endings = sorted((c for c in header if c.startswith("ending") and c[6:].isdigit()), key=lambda c: int(c[6:]))
        for row in reader:
            n = reader.line_num
            if None in row or None in row.values():  # csv puts a long row's extra fields under None, a short row's gaps as None
                fields = len(header) + len(row.get(None) or []) - sum(v is None for v in row.values())
                raise DataError(f"{path}:{n}: {fields} fields for the header's {len(header)}")
            try:
                label = int(row["label"])
            except ValueError:
                raise DataError(f"{path}:{n}: label {row['label']!r} is not an integer") from None
            if not 0 <= label < len(endings):
                raise DataError(f"{path}:{n}: label {label} names none of the {len(endings)} endings")
            empty = [e for e in endings if not row[e].strip()]
            if empty:
                skipped.add(f"{path}:{n}", f"{' and '.join(empty)} empty")
                continue
            seconds = [f"{row['sent2']} {row[e]}" for e in endings]
            out.append(([row["sent1"]] * len(endings), seconds, label))
    skipped.report(len(out))
    if not out:
        raise DataError(f"{path}: no SWAG rows")
    return out


def _ids(text: str, subwords: Subwords) -> List[int]:
    return subwords.to_ids(subwords.tokenize(text))


def multiple_choice_sample(firsts: Sequence[str], seconds, label: int, subwords: Subwords, max_seq_length: int,
                           first_max: int = MAX_QA_LENGTH) -> Dict[str, torch.Tensor]:
    """tokens / tokentype_ids / padding_mask [choices, s] and `label` [].
    `seconds` is one string shared by every choice (RACE's article) or one per choice."""
    if isinstance(seconds, str):
        seconds = [seconds] * len(firsts)
    shared = {}
    rows = []
    for first, second in zip(firsts, seconds):
        a = _ids(first, subwords)[:first_max]
        if second not in shared:
            shared[second] = _ids(second, subwords)
        b = shared[second]
        ids = [subwords.cls_id] + a + [subwords.sep_id] + b + [subwords.sep_id]
        types = [0] * (len(a) + 2) + [1] * (len(b) + 1)
        if len(ids) > max_seq_length:  # trim, keep a final [SEP]
            ids, types = ids[:max_seq_length - 1] + [subwords.sep_id], types[:max_seq_length]
        pad = max_seq_length - len(ids)
        rows.append((ids + [subwords.pad_id] * pad, types + [0] * pad, [1] * len(ids) + [0] * pad))
    return {
        "tokens": torch.tensor([r[0] for r in rows], dtype=torch.long),
        "tokentype_ids": torch.tensor([r[1] for r in rows], dtype=torch.long),
        "padding_mask": torch.tensor([r[2] for r in rows], dtype=torch.long),
        "label": torch.tensor(label, dtype=torch.long),
    }
