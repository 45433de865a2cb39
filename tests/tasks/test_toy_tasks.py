"""The walkthrough's toy tasks (mega.plugins.tasks.toy_tasks) are what docs/downstream.md
says they are: each label is re-derived here from the example's own text by the rule the
docs state, written again independently of the generator, and the trivial baselines are
recounted from the files.
"""
import builtins
import csv
import json
import keyword
import re
from collections import Counter

import pytest

from mega.plugins.tasks.toy_tasks import baselines, write_tasks

# the docs' words: "inhibits"-like verbs are CPR:4, "activates"-like CPR:3
DOWN = {"inhibits", "blocks", "suppresses", "reduces"}
UP = {"activates", "induces", "enhances", "increases"}
STATEMENT_WORDS = {"if", "else", "for", "while", "return", "yield", "import", "class", "def", "lambda", "try",
                   "except", "raise", "with"}


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    return write_tasks(tmp_path_factory.mktemp("toy") / "tasks", train=300, dev=100)


def _tsv(path):
    return [line.rsplit("\t", 1) for line in path.read_text().splitlines()]


def test_question_answering_asks_for_the_word_after_a_python_name(tasks):
    for split in ("train", "dev"):
        for p in json.loads((tasks / f"squad_{split}.json").read_text())["data"][0]["paragraphs"]:
            words, qa = p["context"].split(), p["qas"][0]
            w = re.fullmatch(r"what comes after (\w+) \?", qa["question"]).group(1)
            assert words.count(w) == 1 and (keyword.iskeyword(w) or (w.islower() and hasattr(builtins, w)))
            answer = qa["answers"][0]
            assert answer["text"] == words[words.index(w) + 1] and answer["text"] not in ("a", "an", "the")
            assert p["context"][answer["answer_start"]:].startswith(answer["text"] + " ") or \
                p["context"][answer["answer_start"]:] == answer["text"]


def test_text_classification_is_whether_a_statement_keyword_is_named(tasks):
    rows = _tsv(tasks / "sentences_train.tsv")[1:]
    assert {label for _, label in rows} == {"0", "1"}
    for text, label in rows:
        assert label == str(int(bool(set(text.split()) & STATEMENT_WORDS)))


def test_token_classification_tags_keywords_builtins_and_two_word_operators(tasks):
    texts = (tasks / "ner" / "text_train.txt").read_text().splitlines()
    labels = (tasks / "ner" / "labels_train.txt").read_text().splitlines()
    seen = Counter()
    for text, tags in zip(texts, labels):
        words, tags = text.split(), tags.split()
        expect, i = [], 0
        while i < len(words):
            if words[i:i + 2] in (["not", "in"], ["is", "not"]):
                expect += ["B-OP", "I-OP"]
                i += 2
                continue
            w = words[i]
            expect.append("B-KW" if keyword.iskeyword(w) else
                          "B-BUILTIN" if w.islower() and hasattr(builtins, w) and not w.startswith("_") else "O")
            i += 1
        assert tags == expect, text
        seen.update(tags)
    assert {"B-OP", "I-OP", "B-KW", "B-BUILTIN", "O"} <= set(seen)


def _relation(sentence):
    """The docs' rule: the trigger verb between the two markers, in either order."""
    m = re.search(r"<@(CHEMICAL|GENE)\$>(.*?)<@(CHEMICAL|GENE)\$>", sentence)
    assert m and m.group(1) != m.group(3), sentence
    between = set(m.group(2).split())
    assert not (between & UP and between & DOWN)
    return "CPR:4" if between & DOWN else "CPR:3" if between & UP else "False"


def test_relation_is_the_trigger_verb_between_the_markers(tasks):
    names = dict(line.split("\t") for line in (tasks / "label_mapping.tsv").read_text().splitlines())
    names = {v: k for k, v in names.items()}
    kinds = Counter()
    for split in ("train", "dev"):
        for sentence, label in _tsv(tasks / f"relations_{split}.tsv"):
            assert sentence.count("<@CHEMICAL$>") == 1 and sentence.count("<@GENE$>") == 1
            assert names[label] == _relation(sentence), sentence
            words = set(sentence.split())
            outside = names[label] == "False" and words & (UP | DOWN)
            kinds[names[label], bool(outside)] += 1
    # every kind the docs name is there: both relations, no trigger at all, a trigger outside
    assert {("CPR:3", False), ("CPR:4", False), ("False", False), ("False", True)} <= set(kinds)


def test_multiple_choice_right_ending_is_the_statement_keyword_sent1_names(tasks):
    with open(tasks / "swag_train.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        context = row["sent1"].split()
        endings, label = [row[f"ending{i}"] for i in range(4)], int(row["label"])
        assert row["sent2"] == "it uses" and len(context) <= 16 and set(endings) <= STATEMENT_WORDS
        assert [e in context for e in endings] == [i == label for i in range(4)]
    assert len({row["label"] for row in rows}) == 4
    # the right ending is as common a word as the others: it is not the more frequent name
    count = Counter(w for row in rows for w in row["sent1"].split())
    right = sum(count[row[f"ending{row['label']}"]] > max(count[row[f"ending{i}"]] for i in range(4)
                                                            if i != int(row["label"])) for row in rows)
    assert right / len(rows) < 0.4


def test_baselines_are_the_trivial_predictions_of_the_dev_files(tasks):
    b = baselines(tasks)
    rel = Counter(label for _, label in _tsv(tasks / "relations_dev.tsv"))
    assert b["relation_extraction"]["accuracy"] == pytest.approx(100 * max(rel.values()) / sum(rel.values()))
    with open(tasks / "swag_dev.csv", newline="") as f:
        answers = Counter(row["label"] for row in csv.DictReader(f))
    assert b["multiple_choice"]["accuracy"] == pytest.approx(100 * max(answers.values()) / sum(answers.values()))
    cls = Counter(label for _, label in _tsv(tasks / "sentences_dev.tsv")[1:])
    assert b["text_classification"]["accuracy"] == pytest.approx(100 * max(cls.values()) / sum(cls.values()))
    tags = " ".join((tasks / "ner" / "labels_dev.txt").read_text().split()).split()
    assert b["token_classification"] == pytest.approx({"f1": 0.0, "token_accuracy": 100 * tags.count("O") / len(tags)})
    first = [p for p in json.loads((tasks / "squad_dev.json").read_text())["data"][0]["paragraphs"]]
    def norm(word):  # the official script drops articles: "the" and "a" both become ""
        return "" if word in ("a", "an", "the") else word
    em = sum(norm(p["context"].split()[0]) == norm(p["qas"][0]["answers"][0]["text"]) for p in first) / len(first)
    assert b["question_answering"]["exact_match"] == pytest.approx(100 * em)
