"""Small, learnable fine-tuning tasks in every real format, made from the text of Python's
own documentation topics (the quickstart corpus), so the downstream walkthrough runs with
no download:

    python -m mega.plugins.tasks.toy_tasks OUT_DIR

| files | task | what is learnt | trivial baseline |
|---|---|---|---|
| `squad_{train,dev}.json` | question_answering (SQuAD v1.1) | "what comes after W ?" -> the word after W in the context | the context's first word |
| `sentences_{train,dev}.tsv` | text_classification | 1: the sentence names a statement keyword (if, for, return, class, ...), else 0 | the majority class |
| `ner/{text,labels}_{train,dev}.txt` | token_classification (BIO) | Python keywords (KW), built-in names (BUILTIN), two-word operators `not in` / `is not` (OP) | entity F1 0 (all `O`) |
| `relations_{train,dev}.tsv`, `label_mapping.tsv` | relation_extraction | `<@CHEMICAL$>` ... `<@GENE$>` at most 3 words apart: `CPR:3` (chemical first) / `CPR:4` (gene first); farther: `False` | the majority class |
| `swag_{train,dev}.csv` | multiple_choice (SWAG) | which of 4 endings continues the sentence | 25% |

Everything is a pure function of `seed`.
"""
from __future__ import annotations

import builtins
import csv
import io
import json
import keyword
import os
import random
import re
import sys
from pathlib import Path
from typing import List

KEYWORDS = {k for k in keyword.kwlist if k.isalpha() and k.islower()}
BUILTINS = {n for n in dir(builtins) if n.isalpha() and n.islower() and not n.startswith("_")} - KEYWORDS
OPERATORS = (("not", "in"), ("is", "not"))


def sentences(limit: int = 4000) -> List[List[str]]:
    """Lower-cased word lists of the topics' sentences (6 to 24 plain words)."""
    from pydoc_data.topics import topics

    out = []
    for name in sorted(topics):
        for s in re.split(r"(?<=[.!?])\s+", " ".join(topics[name].split())):
            words = re.findall(r"[a-z]+", s.lower())
            if 6 <= len(words) <= 24:
                out.append(words)
    random.Random(0).shuffle(out)
    return out[:limit]


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def squad(sents, rng) -> dict:
    paragraphs = []
    for n, words in enumerate(sents):
        context = " ".join(words)
        unique = [i for i in range(len(words) - 1) if words.count(words[i]) == 1]
        if not unique:
            continue
        i = rng.choice(unique)
        start = len(" ".join(words[:i + 1])) + 1
        paragraphs.append({"context": context, "qas": [{"id": f"q{n}", "question": f"what comes after {words[i]} ?",
                                                        "answers": [{"text": words[i + 1], "answer_start": start}]}]})
    return {"version": "1.1", "data": [{"title": "pydoc", "paragraphs": paragraphs}]}


STATEMENTS = {"if", "else", "for", "while", "return", "yield", "import", "class", "def", "lambda", "try", "except",
              "raise", "with"}


def statements(sents) -> str:
    """1 when the sentence names one of Python's statement keywords (about half do)."""
    return "sentence\tlabel\n" + "".join(f"{' '.join(w)}\t{int(any(x in STATEMENTS for x in w))}\n" for w in sents)


def ner(sents):
    texts, labels = [], []
    for words in sents:
        tags = ["O"] * len(words)
        for i, w in enumerate(words):
            if i + 1 < len(words) and (w, words[i + 1]) in OPERATORS:
                tags[i], tags[i + 1] = "B-OP", "I-OP"
            elif tags[i] == "O" and w in KEYWORDS:
                tags[i] = "B-KW"
            elif tags[i] == "O" and w in BUILTINS:
                tags[i] = "B-BUILTIN"
        texts.append(" ".join(words))
        labels.append(" ".join(tags))
    return "\n".join(texts) + "\n", "\n".join(labels) + "\n"


RELATIONS = {"CPR:3": 0, "CPR:4": 1, "False": 2}


def relations(sents, rng) -> str:
    lines = []
    for words in sents:
        a, b = rng.sample(range(len(words)), 2)
        w = list(words)
        w[a], w[b] = "<@CHEMICAL$>", "<@GENE$>"
        label = "False" if abs(a - b) > 3 else ("CPR:3" if a < b else "CPR:4")
        lines.append(f"{' '.join(w)}\t{RELATIONS[label]}")
    return "\n".join(lines) + "\n"


def swag(sents, rng) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["video-id", "fold-ind", "startphrase", "sent1", "sent2", "gold-source",
                     "ending0", "ending1", "ending2", "ending3", "label"])
    for n, words in enumerate(sents):
        cut = len(words) // 2
        first, second = words[:cut], words[cut:]
        others = [s for s in rng.sample(sents, 4) if s is not words][:3]
        endings = [" ".join(o[len(o) // 2 + 1:]) or "it" for o in others]
        label = rng.randrange(4)
        endings.insert(label, " ".join(second[1:]) or "it")
        writer.writerow([f"pydoc-{n}", n, " ".join(first), " ".join(first), second[0], "gen", *endings, label])
    return buf.getvalue()


def write_tasks(out: Path, train: int = 1500, dev: int = 200, seed: int = 0) -> Path:
    out = Path(out)
    sents = sentences(train + dev)
    parts = {"train": sents[:train], "dev": sents[train:train + dev]}
    for split, ss in parts.items():
        def rng(task):  # one stream per task: changing one task never changes another's file
            return random.Random(f"{seed}-{split}-{task}")
        _write(out / f"squad_{split}.json", json.dumps(squad(ss, random.Random(f"{seed}-{split}"))))
        _write(out / f"sentences_{split}.tsv", statements(ss))
        text, labels = ner(ss)
        _write(out / "ner" / f"text_{split}.txt", text)
        _write(out / "ner" / f"labels_{split}.txt", labels)
        _write(out / f"relations_{split}.tsv", relations(ss, rng("relations")))
        _write(out / f"swag_{split}.csv", swag(ss, rng("swag")))
    _write(out / "label_mapping.tsv", "".join(f"{k}\t{v}\n" for k, v in RELATIONS.items()))
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m mega.plugins.tasks.toy_tasks OUT_DIR", file=sys.stderr)
        return 2
    print(f"wrote the toy tasks to {write_tasks(Path(argv[0]))}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
