"""The downstream readers on small hand-written files in each real format.

SQuAD features and post-processing are compared with Hugging Face's implementation of the
same reference algorithm (`transformers.data.processors.squad`, `squad_metrics`), run on the
same vocabulary with its slow BertTokenizer; the other formats against hand-worked layouts.
"""
import json

import pytest
import torch

from mega.errors import DataError
from mega.plugins.tasks import multiple_choice_data as mc
from mega.plugins.tasks import relation_extraction_data as re_data
from mega.plugins.tasks import squad_data, squad_predictions
from mega.plugins.tasks import text_classification_data as tc
from mega.plugins.tasks import token_classification_data as tok
from mega.plugins.tasks.metrics import squad as squad_metrics
from mega.plugins.tasks.metrics.classification_report import ClassificationReport
from mega.plugins.tasks.subwords import basic_tokenize, subword_view

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "(", ")", "'", "?", "_", "-",
         "the", "a", "in", "of", "was", "is", "what", "when", "who", "where", "did", "born", "city",
         "built", "bridge", "river", "denver", "broncos", "won", "super", "bowl", "game", "played",
         "1895", "18", "##95", "play", "##ed", "##ing", "he", "she", "it", "paris", "john", "smith",
         "lives", "works", "at", "acme", "corp", "inhibits", "activates", "<", ">", "@", "$",
         "chemical", "gene", "##s", "cat", "dog", "sat", "on", "mat", "ran", "fast", "good", "bad",
         "movie", "very", "not", "and", "to", "new", "york", "##x"]


@pytest.fixture(scope="module")
def bert_tok(tmp_path_factory):
    from transformers import BertTokenizer
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("\n".join(VOCAB) + "\n")
    return BertTokenizer(str(path), do_lower_case=True)


@pytest.fixture(autouse=True)
def _hf_squad_on_numpy2(monkeypatch):
    """transformers 4.47's SQuAD features call np.where on a Python bool (for p_mask, which
    these tests do not compare); numpy 2 refuses 0-d input there."""
    import types

    import numpy as np
    from transformers.data.processors import squad as hf
    shim = types.SimpleNamespace(**{k: getattr(np, k) for k in dir(np) if not k.startswith("__")})
    shim.where = lambda cond, *rest: np.where(np.atleast_1d(cond), *rest)
    monkeypatch.setattr(hf, "np", shim)


@pytest.fixture(scope="module")
def sw(bert_tok):
    return subword_view(bert_tok)


def _squad(version="1.1"):
    ctx = "The bridge was built in 1895. John Smith played in Denver; the Broncos won the Super Bowl game."
    qas = [
        {"id": "q1", "question": "When was the bridge built?", "answers": [{"text": "1895", "answer_start": ctx.index("1895")}]},
        {"id": "q2", "question": "Who played in Denver?", "answers": [{"text": "John Smith", "answer_start": ctx.index("John")},
                                                                        {"text": "Smith", "answer_start": ctx.index("Smith")}]},
        {"id": "q3", "question": "Who won the game?", "answers": [{"text": "the Broncos", "answer_start": ctx.index("the Broncos")}]},
    ]
    if version == "2.0":
        qas.append({"id": "q4", "question": "Where was she born?", "answers": [], "is_impossible": True,
                    "plausible_answers": [{"text": "Denver", "answer_start": ctx.index("Denver")}]})
    return {"version": version, "data": [{"title": "T", "paragraphs": [{"context": ctx, "qas": qas}]}]}


def test_split_context_whitespace_rules():
    words, offsets = squad_data.split_context("a  bc\u202fd\te")
    assert words == ["a", "bc", "d", "e"]
    # whitespace maps to the preceding word
    assert offsets == [0, 0, 0, 1, 1, 1, 2, 2, 3]


def test_read_examples_word_positions(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps(_squad()))
    exs = squad_data.read_examples(squad_data.load_squad_json(path), "train")
    assert [e.qas_id for e in exs] == ["q1", "q2", "q3"]
    assert exs[0].doc_tokens[exs[0].start_position] == "1895." and exs[0].start_position == exs[0].end_position
    assert exs[1].doc_tokens[exs[1].start_position:exs[1].end_position + 1] == ["John", "Smith"]
    assert exs[1].answers == ["John Smith", "Smith"]


def test_bad_squad_files_name_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="bad.json"):
        squad_data.load_squad_json(bad)
    with pytest.raises(DataError, match="missing.json"):
        squad_data.load_squad_json(tmp_path / "missing.json")


@pytest.mark.parametrize("max_seq_length,doc_stride", [(64, 16), (24, 5), (20, 3)])
def test_features_match_hugging_face(bert_tok, sw, max_seq_length, doc_stride):
    from transformers.data.processors import squad as hf
    data = _squad("2.0")
    ours_ex = squad_data.read_examples(data, "train")
    ours = squad_data.convert_examples_to_features(ours_ex, sw, max_seq_length, doc_stride, max_query_length=6)
    hf_examples = hf.SquadV2Processor()._create_examples(data["data"], "train")
    theirs = hf.squad_convert_examples_to_features(hf_examples, bert_tok, max_seq_length, doc_stride, 6,
                                                   is_training=True, threads=1, tqdm_enabled=False)
    assert len(ours) == len(theirs)
    if max_seq_length < 64:  # several windows per question: strides and max-context matter
        assert len(ours) > len(ours_ex)
    for a, b in zip(ours, theirs):
        assert a.input_ids == b.input_ids
        assert a.segment_ids == b.token_type_ids
        assert a.input_mask == b.attention_mask
        assert a.tokens == b.tokens
        assert a.token_to_orig_map == b.token_to_orig_map
        assert a.token_is_max_context == b.token_is_max_context
        assert (a.start_position, a.end_position) == (b.start_position, b.end_position)


def test_improved_answer_span_inside_a_word(sw):
    # the word is "(1895)." but the answer is "1895": the span shrinks to its sub-token
    data = {"data": [{"paragraphs": [{"context": "built (1895). yes", "qas": [
        {"id": "x", "question": "when", "answers": [{"text": "1895", "answer_start": 7}]}]}]}]}
    f = squad_data.convert_examples_to_features(squad_data.read_examples(data), sw, 32, 8, 8)[0]
    assert f.tokens[f.start_position] == "1895" and f.start_position == f.end_position
    s = f.sample()
    assert s["tokens"].shape == (32,) and int(s["start_positions"]) == f.start_position


def test_predictions_match_hugging_face(bert_tok, sw, tmp_path):
    from transformers.data.metrics import squad_metrics as hfm
    from transformers.data.processors import squad as hf
    for version, v2 in (("1.1", False), ("2.0", True)):
        data = _squad(version)
        exs = squad_data.read_examples(data, "eval")
        feats = squad_data.convert_examples_to_features(exs, sw, 24, 5, 6)
        g = torch.Generator().manual_seed(0)
        logits = {f.unique_id: (torch.randn(24, generator=g).tolist(), torch.randn(24, generator=g).tolist()) for f in feats}
        preds, nbest, odds = squad_predictions.get_predictions(exs, feats, logits, n_best_size=5, max_answer_length=6,
                                                               version_2_with_negative=v2, do_lower_case=True)
        hf_examples = hf.SquadV2Processor()._create_examples(data["data"], "dev")
        hf_feats = hf.squad_convert_examples_to_features(hf_examples, bert_tok, 24, 5, 6, is_training=False, threads=1,
                                                         tqdm_enabled=False)
        results = [hf.SquadResult(hfe.unique_id, logits[f.unique_id][0], logits[f.unique_id][1])
                   for f, hfe in zip(feats, hf_feats)]
        files = [tmp_path / f"{n}_{version}.json" for n in ("p", "n", "o")]
        theirs = hfm.compute_predictions_logits(hf_examples, hf_feats, results, 5, 6, True, *map(str, files), False, v2, 0.0,
                                                bert_tok)
        assert preds == dict(theirs)
        their_nbest = json.loads(files[1].read_text())
        assert set(nbest) == set(their_nbest)
        for qid in nbest:
            assert [e["text"] for e in nbest[qid]] == [e["text"] for e in their_nbest[qid]]
            assert [e["probability"] for e in nbest[qid]] == pytest.approx([e["probability"] for e in their_nbest[qid]])
        if v2:
            assert odds == pytest.approx(json.loads(files[2].read_text()))
            # the metrics agree with HF's implementation of the v2.0 script too
            na = {q: 1 / (1 + 2.718281828 ** -o) for q, o in odds.items()}
            ours_m = squad_metrics.evaluate_v2(data["data"], preds, na_probs=na)
            theirs_m = hfm.squad_evaluate(hf_examples, preds, no_answer_probs=na)
            for k in ("exact", "f1", "HasAns_exact", "HasAns_f1", "NoAns_exact", "best_exact", "best_f1"):
                assert ours_m[k] == pytest.approx(theirs_m[k]), k
        written = squad_predictions.write_prediction_files(tmp_path / version, preds, nbest, odds)
        assert json.loads(written[0].read_text()) == preds
        assert written[0].read_text().endswith("}\n") and '    "q1"' in written[0].read_text()


def test_get_final_text_restores_original_characters():
    # the tokenised prediction "smith" comes from "Smith's": the 's is dropped, case restored
    assert squad_predictions.get_final_text("smith", "Smith's", True) == "Smith"
    assert squad_predictions.get_final_text("xyz", "Smith's", True) == "Smith's"
    assert basic_tokenize("Héllo, WORLD!", True) == ["hello", ",", "world", "!"]


# --- text classification, relation extraction ----------------------------------------------


def test_text_classification_file(tmp_path, sw):
    path = tmp_path / "train.tsv"
    path.write_text("sentence\tlabel\nthe movie was good\t1\nvery  bad\tmovie\t0\n\n")
    pairs = tc.read_text_classification(path, num_classes=2)
    assert pairs == [("the movie was good", 1), ("very bad movie", 0)]  # header skipped, text re-joined
    s = tc.classification_samples(pairs, sw, max_seq_length=4)
    # head kept: [CLS] the movie [SEP]
    assert s[0]["tokens"].tolist() == [VOCAB.index(t) for t in ("[CLS]", "the", "movie", "[SEP]")]
    assert s[1]["padding_mask"].tolist() == [1, 1, 1, 1] and int(s[1]["label"]) == 0
    bad = tmp_path / "bad.tsv"
    bad.write_text("good\t7\n")
    with pytest.raises(DataError, match="bad.tsv:1"):
        tc.read_text_classification(bad, num_classes=2)
    assert tc.class_weights([0, 0, 0, 1], 3) == pytest.approx([4 / 6, 4 / 2, 0.0])


def test_chemprot_conversion(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "trainingPosit_chem").write_text(
        "1\t<@CHEMICAL$> inhibits <@GENE$> .\tTrue\tCPR:4\n2\t<@CHEMICAL$> and <@GENE$>\tFalse\tCPR:3\n")
    (src / "testPosit_chem").write_text("3\t<@CHEMICAL$> activates <@GENE$>\tTrue\tCPR:3\n")
    mapping = re_data.convert_chemprot(src, tmp_path / "out")
    assert mapping == {"CPR:4": 0, "False": 1, "CPR:3": 2}  # first appearance: train, then test
    assert (tmp_path / "out" / "train.tsv").read_text().splitlines()[0] == "<@CHEMICAL$> inhibits <@GENE$> .\t0"
    assert re_data.read_label_mapping(tmp_path / "out" / "label_mapping.tsv") == {0: "CPR:4", 1: "False", 2: "CPR:3"}
    pairs = tc.read_text_classification(tmp_path / "out" / "train.tsv")
    assert pairs[1] == ("<@CHEMICAL$> and <@GENE$>", 1)
    rep = ClassificationReport(3)
    rep.update([0, 1, 1, 2], [0, 1, 2, 2])
    # without the False class (id 1): tp 2 (ids 0, 2), fp 0, fn 1
    p, r, _ = re_data.micro_without(rep, 1)
    assert p == pytest.approx(100.0, rel=1e-6) and r == pytest.approx(200 / 3, rel=1e-6)


# --- token classification -------------------------------------------------------------------


def test_token_classification_files_and_alignment(tmp_path, sw):
    (tmp_path / "text_train.txt").write_text("john smith playing in paris\nthe cat sat\n")
    (tmp_path / "labels_train.txt").write_text("B-PER I-PER O O B-LOC\nO O O\n")
    sents = tok.read_token_classification(tmp_path / "text_train.txt", tmp_path / "labels_train.txt")
    ids = tok.build_label_ids([l for _, l in sents])
    assert ids == {"O": 0, "B-LOC": 1, "B-PER": 2, "I-PER": 3}
    tok.write_label_ids(ids, tmp_path / "label_ids.csv")
    assert tok.read_label_ids(tmp_path / "label_ids.csv") == ids
    s = tok.token_classification_sample(*sents[0], sw, ids, 12)
    # [CLS] john smith play ##ing in paris [SEP] pad...
    assert s["tokens"].tolist()[:8] == [VOCAB.index(t) for t in ("[CLS]", "john", "smith", "play", "##ing", "in", "paris", "[SEP]")]
    assert s["labels"].tolist()[:8] == [0, 2, 3, 0, 0, 0, 1, 0]  # the extra sub-token copies its word's label
    assert s["subtokens_mask"].tolist()[:8] == [0, 1, 1, 1, 0, 1, 1, 0]
    assert s["loss_mask"].tolist()[:9] == [1, 1, 1, 1, 1, 1, 1, 1, 0]  # NeMo's default: everything real
    hf_style = tok.token_classification_sample(*sents[0], sw, ids, 12, ignore_extra_tokens=True, ignore_start_end=True)
    assert hf_style["loss_mask"].tolist()[:8] == [0, 1, 1, 1, 0, 1, 1, 0]
    # truncation keeps [CLS] and the tail
    short = tok.token_classification_sample(*sents[0], sw, ids, 4)
    assert short["tokens"].tolist() == [VOCAB.index(t) for t in ("[CLS]", "in", "paris", "[SEP]")]
    with pytest.raises(DataError, match="B-ORG"):
        tok.token_classification_sample(["acme"], ["B-ORG"], sw, ids, 8)
    (tmp_path / "labels_dev.txt").write_text("O O\n")
    with pytest.raises(DataError, match="labels_dev.txt"):
        tok.read_token_classification(tmp_path / "text_train.txt", tmp_path / "labels_dev.txt")


# --- multiple choice -------------------------------------------------------------------------


def test_race_file(tmp_path, sw):
    d = tmp_path / "train" / "high"
    d.mkdir(parents=True)
    (d / "1.txt").write_text(json.dumps({"id": "1", "article": "the cat sat\n on the mat .  it ran",
                                         "questions": ["the _ sat", "who ran?"],
                                         "options": [["cat", "dog"], ["cat", "dog"]], "answers": ["A", "B"]}) + "\n")
    qs = mc.read_race(tmp_path / "train")
    assert qs[0] == (["the cat sat", "the dog sat"], "the cat sat on the mat. it ran", 0)
    assert qs[1][0] == ["who ran? cat", "who ran? dog"] and qs[1][2] == 1
    s = mc.multiple_choice_sample(*qs[0], sw, max_seq_length=8)
    assert s["tokens"].shape == (2, 8)
    # [CLS] the cat sat [SEP] the cat [SEP]  (cut, final [SEP] kept)
    assert s["tokens"][0].tolist() == [VOCAB.index(t) for t in ("[CLS]", "the", "cat", "sat", "[SEP]", "the", "cat", "[SEP]")]
    assert s["tokentype_ids"][0].tolist() == [0, 0, 0, 0, 0, 1, 1, 1]


def test_swag_csv(tmp_path, sw):
    path = tmp_path / "train.csv"
    path.write_text("video-id,fold-ind,startphrase,sent1,sent2,gold-source,ending0,ending1,ending2,ending3,label\n"
                    "v,0,x,the cat sat,it,gold,ran,sat,played,won,2\n")
    qs = mc.read_swag(path)
    assert qs == [(["the cat sat"] * 4, ["it ran", "it sat", "it played", "it won"], 2)]
    s = mc.multiple_choice_sample(*qs[0], sw, 10)
    assert s["tokens"].shape == (4, 10) and int(s["label"]) == 2


def test_toy_tasks_are_valid_files_of_each_format(tmp_path, sw):
    from mega.plugins.tasks.toy_tasks import write_tasks
    out = write_tasks(tmp_path / "tasks", train=30, dev=10)
    data = squad_data.load_squad_json(out / "squad_dev.json")
    for p in data["data"][0]["paragraphs"]:
        qa = p["qas"][0]
        a = qa["answers"][0]
        assert p["context"][a["answer_start"]:a["answer_start"] + len(a["text"])] == a["text"]
        assert qa["question"] == f"what comes after {p['context'][:a['answer_start']].split()[-1]} ?"
    pairs = tc.read_text_classification(out / "sentences_train.tsv", num_classes=2)
    assert len(pairs) == 30 and {l for _, l in pairs} == {0, 1}
    sents = tok.read_token_classification(out / "ner" / "text_dev.txt", out / "ner" / "labels_dev.txt")
    assert len(sents) == 10
    rel = tc.read_text_classification(out / "relations_dev.tsv", num_classes=3)
    assert all("<@CHEMICAL$>" in t and "<@GENE$>" in t for t, _ in rel)
    assert re_data.read_label_mapping(out / "label_mapping.tsv") == {0: "CPR:3", 1: "CPR:4", 2: "False"}
    qs = mc.read_swag(out / "swag_dev.csv")
    assert 0 < len(qs) <= 10 and all(len(q[1]) == 4 and 0 <= q[2] < 4 for q in qs)  # sentences naming no Python name are left out


def test_epoch_order_is_a_function_of_index_and_seed():
    from mega.plugins.tasks.finetune import EpochOrder
    samples = list(range(7))
    a, b, c = EpochOrder(samples, 30, seed=3), EpochOrder(samples, 30, seed=3), EpochOrder(samples, 30, seed=4)
    assert [a[i] for i in range(30)] == [b[i] for i in reversed(range(30))][::-1]  # any access order
    for epoch in range(4):  # every epoch is a permutation of all the samples
        assert sorted(a[i] for i in range(epoch * 7, min(epoch * 7 + 7, 30))) == (samples if epoch < 4 else samples[:2])
    assert [a[i] for i in range(7)] != [c[i] for i in range(7)]
    assert [EpochOrder(samples, 9, seed=3, shuffle=False)[i] for i in range(9)] == samples + samples[:2]
    with pytest.raises(IndexError):
        a[30]


# --- what a reader leaves out, and what stops it (issue 20: 5, 7) ---------------------------


def test_squad_missing_keys_name_the_file_and_the_question(tmp_path):
    data = _squad()
    del data["data"][0]["paragraphs"][0]["qas"][1]["question"]
    with pytest.raises(DataError, match=r"train\.json: question 'q2' has no 'question'"):
        squad_data.read_examples(data, "train", tmp_path / "train.json")
    data = _squad()
    del data["data"][0]["paragraphs"][0]["context"]
    with pytest.raises(DataError, match=r"dev\.json: article 0, paragraph 0 has no 'context'"):
        squad_data.read_examples(data, "eval", tmp_path / "dev.json")
    data = _squad()
    del data["data"][0]["paragraphs"][0]["qas"][2]["answers"][0]["answer_start"]
    with pytest.raises(DataError, match=r"question 'q3': an answer has no 'answer_start'"):
        squad_data.read_examples(data, "train", tmp_path / "train.json")


def test_squad_training_answer_not_at_its_offset_is_skipped_as_bert_and_hf_skip_it(bert_tok, sw, caplog):
    """BERT's run_squad and transformers' SQuAD features drop a training answer whose text
    is not where answer_start points ("Could not find answer"); so does mega, naming it."""
    from transformers.data.processors import squad as hf

    data = _squad()
    qas = data["data"][0]["paragraphs"][0]["qas"]
    qas[0]["answers"][0]["answer_start"] = data["data"][0]["paragraphs"][0]["context"].index("Denver")  # not "1895"
    with caplog.at_level("WARNING", logger="mega"):
        train = squad_data.read_examples(data, "train", "train.json")
    assert [e.qas_id for e in train] == ["q2", "q3"]
    assert "train.json: question 'q1': could not find answer '1895' at answer_start" in caplog.text
    assert "train.json: 1 of 3 questions skipped" in caplog.text
    hf_examples = hf.SquadV1Processor()._create_examples(data["data"], "train")
    theirs = hf.squad_convert_examples_to_features(hf_examples, bert_tok, 64, 16, 6, is_training=True, threads=1,
                                                   tqdm_enabled=False)
    ours = squad_data.convert_examples_to_features(train, sw, 64, 16, 6)
    assert [f.input_ids for f in ours] == [f.input_ids for f in theirs]
    # evaluation keeps every question: the official scores read the gold texts only
    assert [e.qas_id for e in squad_data.read_examples(data, "eval")] == ["q1", "q2", "q3"]


def test_text_classification_lines_without_their_label_are_reported(tmp_path, caplog):
    path = tmp_path / "train.tsv"
    path.write_text("sentence\tlabel\n"  # a header: skipped without a word, as NeMo skips it
                    "the movie was good\t1\n"
                    "the movie was bad\n"  # no label
                    "a good movie\t1\tpositive\n"  # a column after the label
                    "\n"
                    "0\n"  # a label and no text
                    "very bad\t0\n")
    with caplog.at_level("WARNING", logger="mega"):
        pairs = tc.read_text_classification(path, num_classes=2)
    assert pairs == [("the movie was good", 1), ("very bad", 0)]
    assert f"{path}:3: the last field 'bad' is not an integer label" in caplog.text
    assert f"{path}:4: the last field 'positive' is not an integer label" in caplog.text
    assert f"{path}:6: label 0 with no text" in caplog.text
    assert f"{path}: 3 of 5 lines skipped" in caplog.text and ":1:" not in caplog.text


SWAG_HEADER = "video-id,fold-ind,startphrase,sent1,sent2,gold-source,ending0,ending1,ending2,ending3,label\n"


def test_swag_rows_that_cannot_be_read_name_their_line(tmp_path, caplog):
    path = tmp_path / "swag.csv"
    path.write_text(SWAG_HEADER + "v,0,x,the cat sat,it,gold,ran,sat,played,won,2\nv,0,x,the cat,it,gold,ran,sat,played,1\n")
    with pytest.raises(DataError, match=r"swag\.csv:3: 10 fields for the header's 11"):  # one field short
        mc.read_swag(path)
    path.write_text(SWAG_HEADER.replace(",ending3", "") + "v,0,x,the cat sat,it,gold,ran,sat,played,2\n")
    with pytest.raises(DataError, match=r"swag\.csv: the SWAG header lacks ending3"):
        mc.read_swag(path)
    path.write_text(SWAG_HEADER + "v,0,x,the cat sat,it,gold,ran,sat,played,won,4\n")
    with pytest.raises(DataError, match=r"swag\.csv:2: label 4 names none of the 4 endings"):
        mc.read_swag(path)
    path.write_text(SWAG_HEADER + "v,0,x,the cat sat,it,gold,ran,,played,won,2\nv,0,x,a dog,it,gold,ran,sat,played,won,0\n")
    with caplog.at_level("WARNING", logger="mega"):
        qs = mc.read_swag(path)
    assert qs == [(["a dog"] * 4, ["it ran", "it sat", "it played", "it won"], 0)]
    assert f"{path}:2: ending1 empty; skipped" in caplog.text and f"{path}: 1 of 2 rows skipped" in caplog.text


# --- SQuAD v2.0's best threshold (issue 20: 10) -------------------------------------------


def _v2_task(plugins, tmp_path, threshold):
    from mega.config import config_from_dict

    ctx = "Smith built the bridge in 1895."
    data = {"version": "v2.0", "data": [{"title": "T", "paragraphs": [{"context": ctx, "qas": [
        {"id": "a", "question": "When was the bridge built?", "answers": [{"text": "1895", "answer_start": ctx.index("1895")}]},
        {"id": "b", "question": "Who won?", "answers": [], "is_impossible": True}]}]}]}
    (tmp_path / "dev.json").write_text(json.dumps(data))
    (tmp_path / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    cfg = config_from_dict({"model": {
        "name": "question_answering", "validation_ds": str(tmp_path / "dev.json"),
        "tokenizer": {"library": "wordpiece", "vocab_file": str(tmp_path / "vocab.txt")},
        "dataset": {"version_2_with_negative": True, "null_score_diff_threshold": threshold, "max_seq_length": 32}}},
        [], plugins)
    return plugins.tasks.get("question_answering").factory(cfg.model), data


def _confident_null_outputs(task, tokenizer):
    """Both questions' [CLS] scores beat their best span by far (margins 58 and 55);
    question a's best span is its right answer."""
    samples = task.samples("valid", tokenizer)
    _, examples, features = task.examples["valid"]
    outputs = []
    for f in features:
        start, end = torch.zeros(32), torch.zeros(32)
        if examples[f.example_index].qas_id == "a":
            start[0] = end[0] = 30.0
            i = next(i for i in f.token_to_orig_map if f.tokens[i] == "1895")
            start[i] = end[i] = 1.0
        else:
            start[0] = end[0] = 27.5
        outputs.append({"start_logits": start, "end_logits": end})
    assert len(outputs) == len(samples) == 2
    return outputs


def test_v2_best_threshold_is_the_official_scripts_on_null_odds_and_reusable(plugins, bert_tok, tmp_path):
    """`best_*` is what evaluate-v2.0.py prints with `--na-prob-file null_odds.json` (here:
    transformers' implementation of it): the sweep over the raw margins, whose threshold is a
    null_score_diff_threshold that achieves the score. (A sigmoid of the margins ties both
    questions at 1.0 and credits answering a but not b: 100, which no threshold gives.)"""
    from transformers.data.metrics import squad_metrics as hfm
    from transformers.data.processors import squad as hf

    task, data = _v2_task(plugins, tmp_path, threshold=100.0)  # answer everything
    metrics = task.evaluate("valid", _confident_null_outputs(task, bert_tok), tmp_path / "out")
    preds = json.loads((tmp_path / "out" / "predictions.json").read_text())
    null_odds = json.loads((tmp_path / "out" / "null_odds.json").read_text())
    assert preds == {"a": "1895", "b": "Smith"} and null_odds == pytest.approx({"a": 58.0, "b": 55.0})
    theirs = hfm.squad_evaluate(hf.SquadV2Processor()._create_examples(data["data"], "dev"), preds,
                                no_answer_probs=null_odds)
    examples = hf.SquadV2Processor()._create_examples(data["data"], "dev")
    script = hfm.squad_evaluate(examples, preds)  # without --na-prob-file: predictions.json's own scores
    with_odds = hfm.squad_evaluate(examples, preds, no_answer_probs=null_odds)
    for key in ("exact", "f1", "HasAns_exact", "NoAns_exact"):
        assert metrics[key] == pytest.approx(script[key]), key
    for key in ("best_exact", "best_exact_thresh", "best_f1", "best_f1_thresh"):
        assert metrics[key] == pytest.approx(with_odds[key]), key
    assert metrics["best_exact"] == 50.0 and metrics["exact"] == 50.0
    # the threshold reproduces the best score when set as null_score_diff_threshold
    again, _ = _v2_task(plugins, tmp_path, threshold=metrics["best_f1_thresh"])
    assert again.evaluate("valid", _confident_null_outputs(again, bert_tok), None)["f1"] == metrics["best_f1"]
