"""The downstream metrics against hand-computed cases (worked out from the published
definitions in the docstrings of each test, not from our own output)."""
import math
import warnings

import pytest

from mega.plugins.tasks.metrics import seqeval, squad
from mega.plugins.tasks.metrics.classification_report import METRIC_EPS, ClassificationReport


def _data(*qas):
    """A SQuAD `data` list with one paragraph holding `qas` = (id, [answers])."""
    return [{"title": "t", "paragraphs": [{"context": "c", "qas": [
        {"id": qid, "question": "q?", "answers": [{"text": a, "answer_start": 0} for a in answers]}
        for qid, answers in qas]}]}]


# --- SQuAD -----------------------------------------------------------------------------


def test_normalize_answer_order_of_steps():
    # lower -> punctuation out -> articles out -> whitespace collapsed
    assert squad.normalize_answer("The  Cat's (hat)!") == "cats hat"
    assert squad.normalize_answer("An apple, a day") == "apple day"
    # "the" inside a word is not an article; a hyphen is punctuation and simply disappears
    assert squad.normalize_answer("Theatre re-entry") == "theatre reentry"
    # only ASCII punctuation: the em dash stays (and is a word boundary for the article rule)
    assert squad.normalize_answer("x\u2014y") == "x\u2014y"
    assert squad.normalize_answer("a\u2014b") == "\u2014b"


def test_token_f1_by_hand():
    # gold "the big red dog" -> [big, red, dog]; pred "red dog barked" -> [red, dog, barked]
    # common 2: P = 2/3, R = 2/3, F1 = 2/3
    assert squad.f1("the big red dog", "red dog barked") == pytest.approx(2 / 3)
    # multiset intersection: gold [a1, a1] vs pred [a1] -> common 1, P=1, R=1/2 -> 2/3
    assert squad.f1("x x", "x") == pytest.approx(2 / 3)
    # empty handling differs between versions
    assert squad.f1("", "", version="2.0") == 1.0
    assert squad.f1("", "", version="1.1") == 0.0
    assert squad.f1("dog", "", version="2.0") == 0.0
    assert squad.f1("the", "a", version="2.0") == 1.0  # both normalise to nothing


def test_v1_max_over_golds_and_missing_predictions_count_zero():
    data = _data(("q1", ["Denver Broncos", "The Broncos"]), ("q2", ["Carolina"]), ("q3", ["Santa Clara"]))
    preds = {"q1": "broncos", "q2": "Carolina Panthers"}  # q3 unanswered
    out = squad.evaluate_v1(data, preds)
    # q1: EM 1 via "The Broncos"; F1 1. q2: EM 0, F1: P=1/2 R=1 -> 2/3. q3: 0.
    assert out["exact_match"] == pytest.approx(100 * 1 / 3)
    assert out["f1"] == pytest.approx(100 * (1 + 2 / 3) / 3)


def test_v2_has_ans_no_ans_split():
    data = _data(("a", ["blue sky"]), ("b", []), ("c", []), ("d", ["four"]))
    preds = {"a": "the blue sky", "b": "", "c": "something", "d": "five four"}
    out = squad.evaluate_v2(data, preds)
    # a: EM 1 F1 1; b: abstained EM 1 F1 1; c: answered a no-answer: 0, 0;
    # d: EM 0, F1 P=1/2 R=1 -> 2/3
    assert out["exact"] == pytest.approx(100 * 2 / 4)
    assert out["f1"] == pytest.approx(100 * (1 + 1 + 0 + 2 / 3) / 4)
    assert out["HasAns_exact"] == pytest.approx(50.0) and out["HasAns_total"] == 2
    assert out["HasAns_f1"] == pytest.approx(100 * (1 + 2 / 3) / 2)
    assert out["NoAns_exact"] == pytest.approx(50.0) and out["NoAns_f1"] == pytest.approx(50.0)
    assert "best_exact" not in out  # only with no-answer probabilities


def test_v2_needs_every_question_predicted():
    # the official script averages over predicted questions, then fails (KeyError) in the
    # HasAns/NoAns split on any missing one; we say which questions are missing instead
    data = _data(("a", ["x"]), ("b", ["y"]))
    with pytest.raises(ValueError, match="b"):
        squad.evaluate_v2(data, {"a": "x"})


def test_v2_best_threshold_sweep_by_hand():
    # 4 questions: a, b answerable; c, d not. na_probs sorted: a .1, c .2, b .3, d .9
    data = _data(("a", ["x"]), ("b", ["y"]), ("c", []), ("d", []))
    preds = {"a": "x", "b": "y", "c": "z", "d": "w"}
    na = {"a": 0.1, "b": 0.3, "c": 0.2, "d": 0.9}
    out = squad.evaluate_v2(data, preds, na_probs=na)
    # start cur = best = #NoAns = 2, thresh 0.0
    # a (has, score 1): cur 3 > 2 -> best 3 @ .1; c (no-ans, predicted text): cur 2;
    # b (has, 1): cur 3, not > 3; d (no-ans, text): cur 2.  best = 3/4 at 0.1
    assert out["best_exact"] == pytest.approx(75.0) and out["best_exact_thresh"] == 0.1
    assert out["best_f1"] == pytest.approx(75.0) and out["best_f1_thresh"] == 0.1
    # with na_prob_thresh 1.0 nothing changes the raw scores: a, b right, c, d wrong
    assert out["exact"] == pytest.approx(50.0)


def test_v2_no_answer_threshold_applies_before_averaging():
    data = _data(("a", ["x"]), ("c", []))
    out = squad.evaluate_v2(data, {"a": "x", "c": "z"}, na_probs={"a": 0.5, "c": 0.95}, na_prob_thresh=0.9)
    # c: na_prob .95 > .9 -> scored as abstained: float(not has_ans) = 1
    assert out["exact"] == 100.0


# --- ClassificationReport ------------------------------------------------------------------


def test_classification_report_by_hand():
    labels = [0, 0, 0, 1, 1, 2]
    preds = [0, 0, 1, 1, 2, 2]
    rep = ClassificationReport(num_classes=4, label_ids={"a": 0, "b": 1, "c": 2, "d": 3})
    rep.update(preds, labels)
    # class 0: tp 2 fp 0 fn 1; class 1: tp 1 fp 1 fn 1; class 2: tp 1 fp 1 fn 0; class 3: nothing
    assert (rep.tp, rep.fp, rep.fn) == ([2, 1, 1, 0], [0, 1, 1, 0], [1, 1, 0, 0])
    e = METRIC_EPS
    p = [100 * 2 / (2 + e), 100 * 1 / (2 + e), 100 * 1 / (2 + e), 0.0]
    r = [100 * 2 / (3 + e), 100 * 1 / (2 + e), 100 * 1 / (1 + e), 0.0]
    f = [2 * a * b / (a + b + e) for a, b in zip(p, r)]
    P, R, F = rep.compute("all")
    assert P == pytest.approx(p) and R == pytest.approx(r) and F == pytest.approx(f)
    # macro: sum over all classes / 3 classes with support
    assert rep.compute("macro") == pytest.approx((sum(p) / 3, sum(r) / 3, sum(f) / 3))
    # micro: 4 tp of 6 predictions, 6 labels
    mp, mr = 100 * 4 / (6 + e), 100 * 4 / (6 + e)
    assert rep.compute("micro") == pytest.approx((mp, mr, 2 * mp * mr / (mp + mr + e)))
    # weighted by support 3, 2, 1, 0
    assert rep.compute("weighted") == pytest.approx(tuple((3 * v[0] + 2 * v[1] + v[2]) / 6 for v in (p, r, f)))
    assert rep.accuracy() == pytest.approx(100 * 4 / 6)
    text = rep.report()
    assert "a (label_id: 0)" in text and "macro avg" in text


def test_classification_report_macro_ignores_predicted_only_classes():
    rep = ClassificationReport(num_classes=3)
    rep.update([0, 2], [0, 0])  # class 2 predicted once, never a label
    P, R, _ = rep.compute("macro")
    # class 0: tp 1 fp 0 fn 1 -> P = 100/(1+eps), R = 100/(2+eps); class 2: tp 0 fp 1 -> P = 0.
    # The denominator is 1 (only class 0 has support): scikit-learn would give P = 50
    assert P == pytest.approx(100 / (1 + METRIC_EPS)) and R == pytest.approx(100 / (2 + METRIC_EPS))


def test_classification_report_states_add_up():
    a, b, both = ClassificationReport(3), ClassificationReport(3), ClassificationReport(3)
    a.update([0, 1], [0, 2])
    b.update([2, 2], [2, 1])
    both.update([0, 1, 2, 2], [0, 2, 2, 1])
    a.merge(b)
    assert a.state() == both.state()


# --- seqeval ---------------------------------------------------------------------------------


def test_entities_lenient_conlleval_rules():
    assert seqeval.get_entities(["B-PER", "I-PER", "O", "B-LOC"]) == [("PER", 0, 1), ("LOC", 3, 3)]
    # I- after O opens an entity; B-X I-Y is two; B-X B-X is two
    assert seqeval.get_entities(["O", "I-MISC", "I-MISC"]) == [("MISC", 1, 2)]
    assert seqeval.get_entities(["B-PER", "I-LOC"]) == [("PER", 0, 0), ("LOC", 1, 1)]
    assert seqeval.get_entities(["B-PER", "B-PER"]) == [("PER", 0, 0), ("PER", 1, 1)]
    # IOBES
    assert seqeval.get_entities(["S-X", "B-Y", "E-Y", "O"]) == [("X", 0, 0), ("Y", 1, 2)]
    # sentences are joined with an O: no entity crosses the boundary; offsets are global
    assert seqeval.get_entities([["B-A", "I-A"], ["I-A"]]) == [("A", 0, 1), ("A", 3, 3)]


def test_entity_prf_by_hand():
    y_true = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    y_pred = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "I-ORG"]]
    # gold: PER(0,1) LOC(3,3) ORG(5,5); pred: PER(0,1) ORG(3,3) ORG(5,6)
    # tp: PER only. micro P = 1/3, R = 1/3, F1 = 1/3
    assert seqeval.precision_recall_f1(y_true, y_pred) == pytest.approx((1 / 3, 1 / 3, 1 / 3))
    # per type: PER (1,1,1), LOC P 0/0 -> 0 (warn) R 0 F 0, ORG P 0/2 R 0/1 F 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        macro = seqeval.precision_recall_f1(y_true, y_pred, average="macro")
    assert macro == pytest.approx((1 / 3, 1 / 3, 1 / 3))
    assert any("precision" in str(w.message) for w in caught)
    # weighted by true counts 1, 1, 1 -> same
    assert seqeval.precision_recall_f1(y_true, y_pred, average="weighted", zero_division=0) == pytest.approx((1 / 3,) * 3)
    # zero_division=1 puts 1 for LOC's precision
    assert seqeval.precision_recall_f1(y_true, y_pred, average="macro", zero_division=1)[0] == pytest.approx(2 / 3)
    # token accuracy: the 6 tags compared one by one, 2 differ (no separator between sentences)
    assert seqeval.accuracy_score(y_true, y_pred) == pytest.approx((6 - 2) / 6)
    # seqeval's README: 10 tags, 2 differ -> 0.80
    readme_true = [["O", "O", "O", "B-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    readme_pred = [["O", "O", "B-MISC", "I-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    assert seqeval.accuracy_score(readme_true, readme_pred) == pytest.approx(0.80)


def test_seqeval_report_has_every_type_and_averages():
    rep = seqeval.classification_report([["B-A", "O", "B-B"]], [["B-A", "O", "O"]])
    assert rep["A"]["f1"] == 1.0 and rep["B"]["recall"] == 0.0 and rep["B"]["support"] == 1
    assert rep["micro avg"]["precision"] == 1.0 and rep["micro avg"]["recall"] == 0.5
    assert math.isclose(rep["micro avg"]["f1"], 2 / 3)
