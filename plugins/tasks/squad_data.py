"""SQuAD v1.1 / v2.0 JSON -> examples -> BERT features, as NeMo 1.x / BERT's reference
`run_squad` build them.

An *example* is one question with its context split into whitespace words (and, with
answers, the answer's first and last word). A *feature* is one window of the context's
sub-tokens behind the question: `[CLS] question [SEP] window [SEP]`, padded to
`max_seq_length`. A long context gives several overlapping windows (`doc_stride` apart);
each feature keeps which context word each of its sub-tokens came from
(`token_to_orig_map`) and whether this window is the one where the token has the most
context (`token_is_max_context`), which post-processing needs to turn logits back into
answer text. A training answer outside a window points at `[CLS]` (position 0) there.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import attrs
import torch

from mega.errors import DataError
from mega.plugins.tasks.skipped import Skipped
from mega.plugins.tasks.subwords import Subwords

FIRST_UNIQUE_ID = 1000000000


@attrs.define
class SquadExample:
    qas_id: str
    question_text: str
    doc_tokens: List[str]  # the context's whitespace words
    answer_text: Optional[str] = None  # answers[0] (training target)
    start_position: Optional[int] = None  # word index of the answer's first character
    end_position: Optional[int] = None  # word index of its last character
    is_impossible: bool = False
    answers: List[str] = attrs.Factory(list)  # every gold text, for scoring


@attrs.define
class SquadFeature:
    unique_id: int
    example_index: int
    doc_span_index: int
    tokens: List[str]
    token_to_orig_map: Dict[int, int]  # position in `tokens` -> context word
    token_is_max_context: Dict[int, bool]
    input_ids: List[int]
    input_mask: List[int]
    segment_ids: List[int]
    start_position: int = 0
    end_position: int = 0
    is_impossible: bool = False

    def sample(self) -> Dict[str, torch.Tensor]:
        """What `bert_question_answering` trains on: ids, token types, padding mask and the
        answer's first and last positions ([CLS], 0, when it is not in this window)."""
        return {
            "tokens": torch.tensor(self.input_ids, dtype=torch.long),
            "tokentype_ids": torch.tensor(self.segment_ids, dtype=torch.long),
            "padding_mask": torch.tensor(self.input_mask, dtype=torch.long),
            "start_positions": torch.tensor(self.start_position, dtype=torch.long),
            "end_positions": torch.tensor(self.end_position, dtype=torch.long),
        }


def _is_whitespace(c: str) -> bool:
    return c in (" ", "\t", "\r", "\n") or ord(c) == 0x202F


def split_context(context: str):
    """(doc_tokens, char_to_word_offset): maximal non-whitespace runs, and for each
    character the word containing it (whitespace maps to the preceding word)."""
    doc_tokens: List[str] = []
    char_to_word_offset: List[int] = []
    prev_is_whitespace = True
    for c in context:
        if _is_whitespace(c):
            prev_is_whitespace = True
        else:
            if prev_is_whitespace:
                doc_tokens.append(c)
            else:
                doc_tokens[-1] += c
            prev_is_whitespace = False
        char_to_word_offset.append(len(doc_tokens) - 1)
    return doc_tokens, char_to_word_offset


def load_squad_json(path) -> dict:
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: SQuAD file not found") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise DataError(f"{path}: not a SQuAD file (expected {{\"version\": ..., \"data\": [...]}})")
    return data


_KEYS = {"paragraphs": "articles hold `paragraphs`", "context": "paragraphs hold `context` and `qas`",
         "id": "questions hold `id`, `question` and `answers`", "question": "questions hold `id`, `question` and `answers`",
         "text": "answers hold `text` and `answer_start`", "answer_start": "answers hold `text` and `answer_start`"}


def _need(record: dict, key: str, path, what: str):
    """`record[key]`, or a DataError naming the file, the record and the key."""
    if not isinstance(record, dict) or key not in record:
        raise DataError(f"{path}: {what} has no {key!r} (a SQuAD file's {_KEYS[key]})")
    return record[key]


def answer_found(doc_tokens: Sequence[str], start: int, end: int, answer_text: str) -> bool:
    """BERT's training check: the context words the answer's offsets cover contain the
    answer's text (whitespace-normalised); when they do not, `answer_start` does not point
    at `text` (an offset in another encoding, a shifted answer) and the example would train
    on the wrong span."""
    return " ".join(doc_tokens[start:end + 1]).find(" ".join(answer_text.split())) != -1


def read_examples(data: dict, mode: str = "train", path="<squad>") -> List[SquadExample]:
    """One example per question. `mode` is "train" (answers[0] is the target), "eval"
    (also keeps every gold answer) or "infer" (answers are not read).

    A missing key is a DataError naming the file and the question (or article and
    paragraph). In "train" mode a question whose answer text is not where its
    `answer_start` points is skipped, as BERT's and NeMo's readers skip it ("Could not find
    answer"), and reported (mega.plugins.tasks.skipped); evaluation keeps every question,
    its score reads only the gold texts."""
    examples = []
    skipped = Skipped(path, "questions")
    for a, article in enumerate(data["data"]):
        for n, paragraph in enumerate(_need(article, "paragraphs", path, f"article {a}")):
            context = _need(paragraph, "context", path, f"article {a}, paragraph {n}")
            doc_tokens, char_to_word = split_context(context)
            for q, qa in enumerate(paragraph.get("qas", [])):
                qid = str(_need(qa, "id", path, f"article {a}, paragraph {n}, question {q}"))
                where = f"question {qid!r}"
                ex = SquadExample(qas_id=qid, question_text=_need(qa, "question", path, where), doc_tokens=doc_tokens)
                if mode != "infer":
                    ex.is_impossible = bool(qa.get("is_impossible", False))
                    answers = qa.get("answers", [])
                    ex.answers = [_need(ans, "text", path, f"{where}: an answer") for ans in answers]
                    if not ex.is_impossible:
                        if not answers:
                            raise DataError(f"{path}: question {qid!r} has no answers and is not is_impossible")
                        ans = answers[0]
                        ex.answer_text = ans["text"]
                        start = int(_need(ans, "answer_start", path, f"{where}: an answer"))
                        if not 0 <= start < len(context):
                            raise DataError(f"{path}: question {qid!r}: answer_start {start} is outside its context")
                        ex.start_position = char_to_word[start]
                        ex.end_position = char_to_word[min(start + len(ex.answer_text) - 1, len(context) - 1)]
                        if mode == "train" and not answer_found(doc_tokens, ex.start_position, ex.end_position,
                                                                ex.answer_text):
                            skipped.add(f"{path}: {where}", f"could not find answer {ex.answer_text!r} at answer_start "
                                        f"{start} (the context there reads {context[start:start + len(ex.answer_text)]!r})")
                            continue
                examples.append(ex)
    skipped.report(len(examples))
    return examples


def _improve_answer_span(doc_tokens: Sequence[str], start: int, end: int, subwords: Subwords, answer: str):
    """The tightest sub-token span equal to the tokenised answer ("1895" inside "(1895)."),
    or the word-level span when none is."""
    tok_answer = " ".join(subwords.tokenize(answer))
    for new_start in range(start, end + 1):
        for new_end in range(end, new_start - 1, -1):
            if " ".join(doc_tokens[new_start:new_end + 1]) == tok_answer:
                return new_start, new_end
    return start, end


def _check_is_max_context(spans, cur_index: int, position: int) -> bool:
    """Whether window `cur_index` gives token `position` the most context: score =
    min(left, right) + 0.01 * window length; the first best window wins ties."""
    best_score, best_index = None, None
    for index, (span_start, span_length) in enumerate(spans):
        end = span_start + span_length - 1
        if position < span_start or position > end:
            continue
        score = min(position - span_start, end - position) + 0.01 * span_length
        if best_score is None or score > best_score:
            best_score, best_index = score, index
    return cur_index == best_index


def convert_examples_to_features(examples: Sequence[SquadExample], subwords: Subwords, max_seq_length: int = 384,
                                 doc_stride: int = 128, max_query_length: int = 64,
                                 has_groundtruth: bool = True) -> List[SquadFeature]:
    features = []
    unique_id = FIRST_UNIQUE_ID
    for example_index, ex in enumerate(examples):
        query_tokens = subwords.tokenize(ex.question_text)[:max_query_length]
        tok_to_orig, orig_to_tok, all_doc_tokens = [], [], []
        for i, word in enumerate(ex.doc_tokens):
            orig_to_tok.append(len(all_doc_tokens))
            for sub in subwords.tokenize(word):
                tok_to_orig.append(i)
                all_doc_tokens.append(sub)

        tok_start = tok_end = None
        if has_groundtruth and ex.is_impossible:
            tok_start = tok_end = -1
        elif has_groundtruth and ex.start_position is not None:
            tok_start = orig_to_tok[ex.start_position]
            if ex.end_position < len(ex.doc_tokens) - 1:
                tok_end = orig_to_tok[ex.end_position + 1] - 1
            else:
                tok_end = len(all_doc_tokens) - 1
            tok_start, tok_end = _improve_answer_span(all_doc_tokens, tok_start, tok_end, subwords, ex.answer_text)

        max_tokens_for_doc = max_seq_length - len(query_tokens) - 3
        if max_tokens_for_doc < 1:
            raise DataError(f"max_seq_length {max_seq_length} leaves no room for the context after a "
                            f"{len(query_tokens)}-token question (lower max_query_length)")
        spans = []  # (start, length)
        start = 0
        while start < len(all_doc_tokens):
            length = min(len(all_doc_tokens) - start, max_tokens_for_doc)
            spans.append((start, length))
            if start + length == len(all_doc_tokens):
                break
            start += min(length, doc_stride)

        for span_index, (span_start, span_length) in enumerate(spans):
            tokens = ["[CLS]"] + query_tokens + ["[SEP]"]
            ids = [subwords.cls_id] + subwords.to_ids(query_tokens) + [subwords.sep_id]
            segment_ids = [0] * len(tokens)
            token_to_orig_map, token_is_max_context = {}, {}
            window = all_doc_tokens[span_start:span_start + span_length]
            for i in range(span_length):
                split_index = span_start + i
                token_to_orig_map[len(tokens)] = tok_to_orig[split_index]
                token_is_max_context[len(tokens)] = _check_is_max_context(spans, span_index, split_index)
                tokens.append(window[i])
                segment_ids.append(1)
            ids += subwords.to_ids(window)
            tokens.append("[SEP]")
            ids.append(subwords.sep_id)
            segment_ids.append(1)
            input_mask = [1] * len(ids)
            pad = max_seq_length - len(ids)
            ids += [subwords.pad_id] * pad
            input_mask += [0] * pad
            segment_ids += [0] * pad

            start_position = end_position = 0
            if has_groundtruth and tok_start is not None and tok_start >= 0:
                span_end = span_start + span_length - 1
                if span_start <= tok_start and tok_end <= span_end:
                    offset = len(query_tokens) + 2
                    start_position = tok_start - span_start + offset
                    end_position = tok_end - span_start + offset
            features.append(SquadFeature(
                unique_id=unique_id, example_index=example_index, doc_span_index=span_index, tokens=tokens,
                token_to_orig_map=token_to_orig_map, token_is_max_context=token_is_max_context,
                input_ids=ids, input_mask=input_mask, segment_ids=segment_ids, start_position=start_position,
                end_position=end_position, is_impossible=bool(ex.is_impossible)))
            unique_id += 1
    return features
