"""Small, learnable fine-tuning tasks in every real format, made from the text of Python's
own documentation topics (the quickstart corpus), so the downstream walkthrough runs with
no download:

    python -m mega.plugins.tasks.toy_tasks OUT_DIR

| files | task | what is learnt | trivial baseline |
|---|---|---|---|
| `squad_{train,dev}.json` | question_answering (SQuAD v1.1) | "what comes after W ?" -> the word after W in the context, W a Python keyword or built-in name it has once, followed by a word that is not an article (sentences with none are left out) | the context's first word; the most frequent answer |
| `sentences_{train,dev}.tsv` | text_classification | 1: the sentence names a statement keyword (if, for, return, class, ...), else 0 | the majority class |
| `ner/{text,labels}_{train,dev}.txt` | token_classification (BIO) | Python keywords (KW), built-in names (BUILTIN), two-word operators `not in` / `is not` (OP) | entity F1 0 (all `O`) |
| `relations_{train,dev}.tsv`, `label_mapping.tsv` | relation_extraction | the verb between `<@CHEMICAL$>` and `<@GENE$>` (either order): `inhibits` / `blocks` / `suppresses` / `reduces` -> `CPR:4`, `activates` / `induces` / `enhances` / `increases` -> `CPR:3`; a neutral verb (`binds`, ...) between them, or a trigger outside them -> `False` | the majority class |
| `swag_{train,dev}.csv` | multiple_choice (SWAG) | "`sent1` it uses _": the one ending that is a statement keyword (`if`, `for`, `return`, ...) `sent1` names; the other three are statement keywords it does not name, drawn by corpus frequency (sentences naming none are left out) | the most frequent right ending; the most frequent word of the four |

Everything is a pure function of `seed`; `baselines(OUT_DIR)` computes the trivial
baselines from the dev files (the command prints them).
"""
from __future__ import annotations

import builtins
import csv
import io
import json
import keyword
import random
import re
import sys
from pathlib import Path
from typing import List
from mega.checkpoint.atomic import atomic_write_text

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
    atomic_write_text(path, text)


QUESTION_WORDS = KEYWORDS | BUILTINS  # W of "what comes after W ?": a Python name
ARTICLES = ("a", "an", "the")  # never an answer: the SQuAD scripts' normalisation deletes them


def squad(sents, rng) -> dict:
    """"what comes after W ?", W a Python keyword or built-in name the context has once, the
    answer the next word, not an article (sentences with no such W are left out)."""
    paragraphs = []
    for n, words in enumerate(sents):
        context = " ".join(words)
        unique = [i for i in range(len(words) - 1) if words.count(words[i]) == 1 and words[i] in QUESTION_WORDS
                  and words[i + 1] not in ARTICLES]
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
CHEMICAL, GENE = "<@CHEMICAL$>", "<@GENE$>"
# ChemProt's classes, by the trigger verb between the two entities: CPR:3 is its
# upregulator/activator group, CPR:4 its downregulator/inhibitor group.
TRIGGERS = {"activates": "CPR:3", "induces": "CPR:3", "enhances": "CPR:3", "increases": "CPR:3",
            "inhibits": "CPR:4", "blocks": "CPR:4", "suppresses": "CPR:4", "reduces": "CPR:4"}
NEUTRAL = ("binds", "resembles", "precedes", "accompanies")  # verbs that state no CPR:3/CPR:4 relation
# (sentences are drawn as 30% CPR:3, 30% CPR:4, 20% a neutral verb between the markers,
# 20% a trigger outside them)
RELATION_KINDS = (("CPR:3", 3), ("CPR:4", 3), ("neutral", 2), ("outside", 2))


def relation_label(sentence: str) -> str:
    """The label of a relation sentence: the class of the trigger verb between the two
    markers (either order), `False` when there is none."""
    words = sentence.split()
    a, b = sorted((words.index(CHEMICAL), words.index(GENE)))
    found = {TRIGGERS[w] for w in words[a + 1:b] if w in TRIGGERS}
    assert len(found) <= 1, sentence
    return found.pop() if found else "False"


def relations(sents, rng) -> str:
    """A trigger verb (or a neutral one) and the two markers inserted into a sentence, the
    markers 0 to 3 of its words apart (plus the verb), in either order."""
    kinds = [k for k, n in RELATION_KINDS for _ in range(n)]
    lines = []
    for words in sents:
        words = [w for w in words if w not in TRIGGERS]  # the sentence's own words state nothing
        kind = rng.choice(kinds)
        gap = rng.randint(0, 3)
        start = rng.randrange(len(words) - gap + 1)
        left, mid, right = words[:start], words[start:start + gap], words[start + gap:]
        if kind == "neutral":
            verb = rng.choice(NEUTRAL)
        else:
            verb = rng.choice([t for t, c in TRIGGERS.items() if kind == "outside" or c == kind])
        if kind == "outside":
            side = left if (rng.random() < 0.5 or not right) and left else right
            side.insert(rng.randint(0, len(side)), verb)
        else:
            mid.insert(rng.randint(0, len(mid)), verb)
        first, second = rng.sample([CHEMICAL, GENE], 2)
        sentence = " ".join(left + [first] + mid + [second] + right)
        label = relation_label(sentence)
        assert label == (kind if kind in RELATIONS else "False"), (kind, sentence)
        lines.append(f"{sentence}\t{RELATIONS[label]}")
    return "\n".join(lines) + "\n"


SWAG_CONTEXT_WORDS = 16  # the context is a sentence's first 16 words at most


def swag(sents, rng) -> str:
    """sent1: a sentence (its first 16 words at most) that names a statement keyword, sent2
    "it uses"; the right ending is one of the keywords sent1 names, the three others
    keywords it does not name, drawn as often as they occur in the corpus (a keyword's
    frequency tells little: sent1 does). Sentences without one are left out."""
    occurrences = [w for s in sents for w in s[:SWAG_CONTEXT_WORDS] if w in STATEMENTS]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["video-id", "fold-ind", "startphrase", "sent1", "sent2", "gold-source",
                     "ending0", "ending1", "ending2", "ending3", "label"])
    for n, words in enumerate(sents):
        context = words[:SWAG_CONTEXT_WORDS]
        used = [w for w in context if w in STATEMENTS]
        if not used:
            continue
        if len(set(occurrences) - set(context)) < 3:  # too few other keywords to draw three wrong endings from
            continue
        answer = rng.choice(used)
        others: List[str] = []
        while len(others) < 3:
            w = rng.choice(occurrences)
            if w not in context and w not in others:
                others.append(w)
        label = rng.randrange(4)
        endings = others[:label] + [answer] + others[label:]
        sent1, sent2 = " ".join(context), "it uses"
        writer.writerow([f"pydoc-{n}", n, f"{sent1} {sent2}", sent1, sent2, "gen", *endings, label])
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


def baselines(out: Path, split: str = "dev") -> dict:
    """The trivial baselines of a split, computed from its files with the metrics `mega
    evaluate` reports: the context's first word as every answer, the majority class, every
    word `O`, the most frequent right ending."""
    from collections import Counter

    from mega.plugins.tasks import multiple_choice_data as mc
    from mega.plugins.tasks import text_classification_data as tc
    from mega.plugins.tasks import token_classification_data as tok
    from mega.plugins.tasks.metrics import seqeval, squad as squad_metrics

    out = Path(out)
    data = json.loads((out / f"squad_{split}.json").read_text())["data"]
    first = {qa["id"]: p["context"].split()[0] for a in data for p in a["paragraphs"] for qa in p["qas"]}
    qa = squad_metrics.evaluate_v1(data, first)
    frequent = Counter(q["answers"][0]["text"] for a in data for p in a["paragraphs"] for q in p["qas"])
    frequent_qa = squad_metrics.evaluate_v1(data, {qid: frequent.most_common(1)[0][0] for qid in first})

    def majority(labels):
        return 100 * Counter(labels).most_common(1)[0][1] / len(labels)

    sents = [l for _, l in tc.read_text_classification(out / f"sentences_{split}.tsv", num_classes=2)]
    tags = [t for _, t in tok.read_token_classification(out / "ner" / f"text_{split}.txt",
                                                         out / "ner" / f"labels_{split}.txt")]
    all_o = [["O"] * len(t) for t in tags]
    rels = [l for _, l in tc.read_text_classification(out / f"relations_{split}.tsv", num_classes=len(RELATIONS))]
    questions = mc.read_swag(out / f"swag_{split}.csv")
    answers = [q[2] for q in questions]
    # the ending that is the most frequent word of the training contexts: what word frequency alone gets
    counts = Counter(w for q in mc.read_swag(out / "swag_train.csv") for w in q[0][0].split())
    frequent = [max(range(4), key=lambda i: counts[q[1][i].split()[-1]]) == q[2] for q in questions]
    return {
        "question_answering": {"exact_match": qa["exact_match"], "f1": qa["f1"],
                               "most_frequent_answer_exact_match": frequent_qa["exact_match"],
                               "most_frequent_answer_f1": frequent_qa["f1"]},
        "text_classification": {"accuracy": majority(sents)},
        "token_classification": {"f1": 100 * seqeval.f1_score(tags, all_o, zero_division=0),
                                 "token_accuracy": 100 * seqeval.accuracy_score(tags, all_o)},
        "relation_extraction": {"accuracy": majority(rels), "positive_f1": 0.0},
        "multiple_choice": {"accuracy": majority(answers), "chance": 25.0,
                            "most_frequent_word": 100 * sum(frequent) / len(frequent)},
    }


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m mega.plugins.tasks.toy_tasks OUT_DIR", file=sys.stderr)
        return 2
    out = write_tasks(Path(argv[0]))
    print(f"wrote the toy tasks to {out}; trivial baselines on dev:")
    for task, figures in baselines(out).items():
        print(f"  {task}: " + ", ".join(f"{k} {v:.1f}" for k, v in figures.items()))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
