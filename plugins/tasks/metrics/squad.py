"""The official SQuAD evaluation, v1.1 and v2.0, as the published scripts define it.

Both versions normalise answers the same way (lower case, ASCII punctuation removed, the
articles a/an/the removed, whitespace collapsed) and score each question by the best match
over its gold answers. They differ where it matters for reported numbers, so both are kept:

* v1.1 has no special case for empty token lists (an empty prediction scores 0) and divides
  by every question of the dataset (a missing prediction scores 0).
* v2.0 scores an empty-vs-empty pair as 1 (a correctly abstained no-answer question),
  averages over the questions that have a prediction, splits the scores into HasAns/NoAns,
  and, given no-answer scores (`--na-prob-file`), reports the best threshold (`best_exact`,
  `best_f1`). The script only sorts those scores, so BERT's raw null score margins
  (`null_odds.json`) serve, and the threshold comes out in their unit (`best_thresholds`).

NeMo 1.x reports `best_exact`/`best_f1` computed with all-zero no-answer probabilities as
its EM/F1; for v2.0 that can exceed the true `exact`. We report `exact`/`f1` as the official
script does, and `best_*` only from real no-answer scores.
"""
from __future__ import annotations

import collections
import re
import string
from typing import Dict, Iterable, List, Mapping, Optional

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lower case, drop ASCII punctuation, replace articles by a space, collapse whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def get_tokens(s: str) -> List[str]:
    return normalize_answer(s).split() if s else []


def exact_match(gold: str, pred: str) -> int:
    return int(normalize_answer(gold) == normalize_answer(pred))


def f1(gold: str, pred: str, version: str = "2.0") -> float:
    """Token F1 over normalised tokens (a multiset intersection). Only v2.0 scores a pair
    where either side is empty as `gold == pred`; v1.1 scores it 0."""
    gold_toks, pred_toks = get_tokens(gold), get_tokens(pred)
    if version != "1.1" and (not gold_toks or not pred_toks):
        return float(gold_toks == pred_toks)
    common = collections.Counter(gold_toks) & collections.Counter(pred_toks)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_toks)
    recall = num_same / len(gold_toks)
    return 2 * precision * recall / (precision + recall)


def gold_answers(dataset: Iterable[Mapping]) -> Dict[str, List[str]]:
    """qid -> the answer texts of the `data` list of a SQuAD JSON file (as in the file)."""
    out = {}
    for article in dataset:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                out[qa["id"]] = [a["text"] for a in qa.get("answers", [])]
    return out


def evaluate_v1(dataset: Iterable[Mapping], predictions: Mapping[str, str]) -> Dict[str, float]:
    """The v1.1 script: `exact_match` and `f1` in percent over every question of the data
    (a missing prediction counts 0)."""
    golds = gold_answers(dataset)
    em_sum = f1_sum = 0.0
    for qid, answers in golds.items():
        if qid not in predictions:
            continue  # "Unanswered question ... will receive score 0."
        pred = predictions[qid]
        em_sum += max(exact_match(g, pred) for g in answers)
        f1_sum += max(f1(g, pred, version="1.1") for g in answers)
    total = len(golds)
    return {"exact_match": 100.0 * em_sum / total, "f1": 100.0 * f1_sum / total, "total": total}


def raw_scores_v2(dataset: Iterable[Mapping], predictions: Mapping[str, str]):
    """Per-question exact and F1 (v2.0): golds that normalise to "" are dropped, and a
    question with none left has the single gold "" (so abstaining scores 1)."""
    exact, f1s = {}, {}
    for qid, answers in gold_answers(dataset).items():
        golds = [a for a in answers if normalize_answer(a)] or [""]
        if qid not in predictions:
            continue  # "Missing prediction for ..."
        pred = predictions[qid]
        exact[qid] = max(exact_match(g, pred) for g in golds)
        f1s[qid] = max(f1(g, pred, version="2.0") for g in golds)
    return exact, f1s


def _apply_no_answer_threshold(scores, na_probs, qid_to_has_ans, thresh):
    return {qid: float(not qid_to_has_ans[qid]) if na_probs[qid] > thresh else s for qid, s in scores.items()}


def _mean(scores: Mapping[str, float], qids: Optional[List[str]] = None) -> Dict[str, float]:
    qids = list(scores) if qids is None else qids
    total = len(qids)
    return {"score": 100.0 * sum(scores[q] for q in qids) / total if total else 0.0, "total": total}


def _best_threshold(preds, scores, na_probs, qid_to_has_ans):
    """Sweep "answer only when na_prob <= t" over the sorted probabilities: the best score
    (percent) and the threshold reaching it, as the official script's find_best_thresh."""
    num_no_ans = sum(1 for q in qid_to_has_ans if not qid_to_has_ans[q])
    cur = best = num_no_ans
    best_thresh = 0.0
    for qid in sorted(na_probs, key=lambda k: na_probs[k]):
        if qid not in scores:
            continue
        if qid_to_has_ans[qid]:
            diff = scores[qid]
        else:
            diff = -1 if preds[qid] else 0
        cur += diff
        if cur > best:
            best = cur
            best_thresh = na_probs[qid]
    return 100.0 * best / len(scores), best_thresh


def evaluate_v2(dataset: Iterable[Mapping], predictions: Mapping[str, str],
                na_probs: Optional[Mapping[str, float]] = None, na_prob_thresh: float = 1.0) -> Dict[str, float]:
    """The v2.0 script: `exact`, `f1`, `total` over the questions (every one must be predicted), `HasAns_*` and
    `NoAns_*` (when the data has such questions) and, given `na_probs` (qid -> probability
    of no answer), `best_exact`, `best_exact_thresh`, `best_f1`, `best_f1_thresh`."""
    dataset = list(dataset)
    qid_to_has_ans = {}
    for article in dataset:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                qid_to_has_ans[qa["id"]] = bool(qa.get("answers"))
    missing = [q for q in qid_to_has_ans if q not in predictions]
    if missing:  # the official script raises KeyError in its HasAns/NoAns split
        raise ValueError(f"no prediction for {len(missing)} question(s): {', '.join(missing[:5])}")
    has_ans = [q for q, h in qid_to_has_ans.items() if h]
    no_ans = [q for q, h in qid_to_has_ans.items() if not h]
    probs = dict(na_probs) if na_probs is not None else {q: 0.0 for q in predictions}
    exact_raw, f1_raw = raw_scores_v2(dataset, predictions)
    exact_t = _apply_no_answer_threshold(exact_raw, probs, qid_to_has_ans, na_prob_thresh)
    f1_t = _apply_no_answer_threshold(f1_raw, probs, qid_to_has_ans, na_prob_thresh)
    e, f = _mean(exact_t), _mean(f1_t)
    out = {"exact": e["score"], "f1": f["score"], "total": e["total"]}
    if has_ans:
        out.update({"HasAns_exact": _mean(exact_t, has_ans)["score"], "HasAns_f1": _mean(f1_t, has_ans)["score"],
                    "HasAns_total": len(has_ans)})
    if no_ans:
        out.update({"NoAns_exact": _mean(exact_t, no_ans)["score"], "NoAns_f1": _mean(f1_t, no_ans)["score"],
                    "NoAns_total": len(no_ans)})
    if na_probs is not None:
        out["best_exact"], out["best_exact_thresh"] = _best_threshold(predictions, exact_raw, probs, qid_to_has_ans)
        out["best_f1"], out["best_f1_thresh"] = _best_threshold(predictions, f1_raw, probs, qid_to_has_ans)
    return out


def best_thresholds(dataset: Iterable[Mapping], predictions: Mapping[str, str],
                    null_odds: Mapping[str, float]) -> Dict[str, float]:
    """`best_exact`, `best_exact_thresh`, `best_f1`, `best_f1_thresh` of the v2.0 script run
    with `--na-prob-file null_odds.json`: the sweep over the raw null score margins (BERT's
    `null_odds.json`, which the script only sorts), so a threshold is in the margin's unit
    and is a `null_score_diff_threshold` that achieves the score. (Squashing the margins
    into probabilities first, e.g. by a sigmoid, ties every confident margin at 1.0, and
    the sweep then credits a cut between tied questions that no threshold makes.) As in
    the script, the threshold is 0.0 when abstaining on every question scores best."""
    dataset = list(dataset)
    has_ans = {qid: bool(answers) for qid, answers in gold_answers(dataset).items()}
    exact_raw, f1_raw = raw_scores_v2(dataset, predictions)
    probs = {qid: float(null_odds[qid]) for qid in has_ans if qid in null_odds}
    out = {}
    out["best_exact"], out["best_exact_thresh"] = _best_threshold(predictions, exact_raw, probs, has_ans)
    out["best_f1"], out["best_f1_thresh"] = _best_threshold(predictions, f1_raw, probs, has_ans)
    return out


def evaluate(dataset: Iterable[Mapping], predictions: Mapping[str, str], version_2_with_negative: bool,
             na_probs: Optional[Mapping[str, float]] = None) -> Dict[str, float]:
    """The official script for the dataset's version: v2.0 when `version_2_with_negative`."""
    if version_2_with_negative:
        return evaluate_v2(dataset, predictions, na_probs)
    return evaluate_v1(dataset, predictions)
