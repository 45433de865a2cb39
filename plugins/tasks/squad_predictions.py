"""Start/end logits of every window -> one answer per question, and the files SQuAD
evaluations read: `predictions.json`, `nbest_predictions.json` and (v2.0) `null_odds.json`.

For each question, the `n_best_size` highest start and end logits of each of its windows are
paired; pairs outside the context, reversed, longer than `max_answer_length` sub-tokens, or
starting where another window has more context are dropped; the rest are ranked by
start + end logit and turned back into original text (`get_final_text` restores the
original case, accents and punctuation the tokenised span lost). With
`version_2_with_negative` the question abstains ("") when the best null score (the `[CLS]`
logits) beats the best answer by more than `null_score_diff_threshold`.
"""
from __future__ import annotations

import collections
import json
import math
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from mega.plugins.tasks.squad_data import SquadExample, SquadFeature
from mega.plugins.tasks.subwords import basic_tokenize
from mega.checkpoint.atomic import atomic_write_text


def get_best_indexes(logits: Sequence[float], n_best_size: int) -> List[int]:
    """Indices of the `n_best_size` largest logits (a stable sort: ties keep the lower index)."""
    return [i for i, _ in sorted(enumerate(logits), key=lambda x: x[1], reverse=True)[:n_best_size]]


def _strip_spaces(text: str):
    chars, mapping = [], {}
    for i, c in enumerate(text):
        if c == " ":
            continue
        mapping[len(chars)] = i
        chars.append(c)
    return "".join(chars), mapping


def get_final_text(pred_text: str, orig_text: str, do_lower_case: bool) -> str:
    """The span of `orig_text` that `pred_text` (tokenised, normalised) came from; the whole
    `orig_text` when the two cannot be aligned character by character."""
    tok_text = " ".join(basic_tokenize(orig_text, do_lower_case))
    start = tok_text.find(pred_text)
    if start == -1:
        return orig_text
    end = start + len(pred_text) - 1
    orig_ns, orig_map = _strip_spaces(orig_text)
    tok_ns, tok_map = _strip_spaces(tok_text)
    if len(orig_ns) != len(tok_ns):
        return orig_text
    tok_to_orig = {tok_i: i for i, tok_i in tok_map.items()}
    orig_start = orig_map.get(tok_to_orig.get(start)) if start in tok_to_orig else None
    orig_end = orig_map.get(tok_to_orig.get(end)) if end in tok_to_orig else None
    if orig_start is None or orig_end is None:
        return orig_text
    return orig_text[orig_start:orig_end + 1]


def _softmax(scores: Sequence[float]) -> List[float]:
    if not scores:
        return []
    top = max(scores)
    exps = [math.exp(s - top) for s in scores]
    total = sum(exps)
    return [e / total for e in exps]


Prelim = collections.namedtuple("Prelim", ["feature_index", "start_index", "end_index", "start_logit", "end_logit"])
NBest = collections.namedtuple("NBest", ["text", "start_logit", "end_logit"])


def get_predictions(examples: Sequence[SquadExample], features: Sequence[SquadFeature],
                    logits: Dict[int, Tuple[Sequence[float], Sequence[float]]], n_best_size: int = 20,
                    max_answer_length: int = 30, version_2_with_negative: bool = False,
                    null_score_diff_threshold: float = 0.0, do_lower_case: bool = True):
    """(predictions {qid: text}, nbest {qid: [{text, probability, start_logit, end_logit}]},
    null_odds {qid: score_diff}, v2.0 only). `logits` maps a feature's unique_id to its
    (start_logits, end_logits)."""
    by_example = collections.defaultdict(list)
    for f in features:
        by_example[f.example_index].append(f)
    predictions, nbest_json, null_odds = {}, {}, {}
    for example_index, ex in enumerate(examples):
        feats = by_example[example_index]
        prelims = []
        score_null, min_null_feature, null_start, null_end = 1e6, 0, 0.0, 0.0
        for fi, f in enumerate(feats):
            start_logits, end_logits = (list(map(float, x)) for x in logits[f.unique_id])
            if version_2_with_negative:
                feature_null = start_logits[0] + end_logits[0]
                if feature_null < score_null:
                    score_null, min_null_feature = feature_null, fi
                    null_start, null_end = start_logits[0], end_logits[0]
            for i in get_best_indexes(start_logits, n_best_size):
                for j in get_best_indexes(end_logits, n_best_size):
                    if i >= len(f.tokens) or j >= len(f.tokens):
                        continue
                    if i not in f.token_to_orig_map or j not in f.token_to_orig_map:
                        continue
                    if not f.token_is_max_context.get(i, False):
                        continue
                    if j < i or j - i + 1 > max_answer_length:
                        continue
                    prelims.append(Prelim(fi, i, j, start_logits[i], end_logits[j]))
        if version_2_with_negative:
            prelims.append(Prelim(min_null_feature, 0, 0, null_start, null_end))
        prelims.sort(key=lambda p: p.start_logit + p.end_logit, reverse=True)

        seen, nbest = set(), []
        for p in prelims:
            if len(nbest) >= n_best_size:
                break
            f = feats[p.feature_index]
            if p.start_index > 0:
                tok_text = " ".join(f.tokens[p.start_index:p.end_index + 1])
                tok_text = tok_text.replace(" ##", "").replace("##", "").strip()
                tok_text = " ".join(tok_text.split())
                orig_text = " ".join(ex.doc_tokens[f.token_to_orig_map[p.start_index]:f.token_to_orig_map[p.end_index] + 1])
                final = get_final_text(tok_text, orig_text, do_lower_case)
            else:
                final = ""
            if final in seen:
                continue
            seen.add(final)
            nbest.append(NBest(final, p.start_logit, p.end_logit))
        if version_2_with_negative:
            if "" not in seen:
                nbest.append(NBest("", null_start, null_end))
            if len(nbest) == 1:
                nbest.insert(0, NBest("empty", 0.0, 0.0))
        if not nbest:
            nbest.append(NBest("empty", 0.0, 0.0))

        probs = _softmax([e.start_logit + e.end_logit for e in nbest])
        nbest_json[ex.qas_id] = [{"text": e.text, "probability": prob, "start_logit": e.start_logit,
                                  "end_logit": e.end_logit} for e, prob in zip(nbest, probs)]
        if not version_2_with_negative:
            predictions[ex.qas_id] = nbest[0].text
        else:
            best_non_null = next((e for e in nbest if e.text), nbest[0])
            score_diff = score_null - best_non_null.start_logit - best_non_null.end_logit
            null_odds[ex.qas_id] = score_diff
            predictions[ex.qas_id] = "" if score_diff > null_score_diff_threshold else best_non_null.text
    return predictions, nbest_json, null_odds


def write_json(obj, path) -> Path:
    """`json.dumps(obj, indent=4)` plus a newline, as the reference writers; temp then rename."""
    path = Path(path)
    atomic_write_text(path, json.dumps(obj, indent=4) + "\n")
    return path


def write_prediction_files(directory, predictions, nbest, null_odds=None) -> List[Path]:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    out = [write_json(predictions, directory / "predictions.json"), write_json(nbest, directory / "nbest_predictions.json")]
    if null_odds:
        out.append(write_json(null_odds, directory / "null_odds.json"))
    return out
