"""BERT pretraining samples (Megatron-LM's BertDataset) against references written in the
test: textbook scalar Mersenne Twisters (checked on the C++ standard's test vectors), the
sample map walked by hand, a step-by-step numpy transcription of one sample, and the
statistics the objective promises (15% masked, 80/10/10, whole words, SOP/NSP labels)."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from mega.config import config_from_dict
from mega.errors import ConfigError, DataError
from mega.plugins.data.bert_samples import BertSamples, build_sample_map
from mega.plugins.data.mersenne import MT19937, MT19937_64
from mega.plugins.data.objectives import BertObjective
from mega.plugins.data.sentences import TokenizedDocuments, read_documents, split_sentences
from mega.plugins.data.text_index import TextMemMapIndex
from mega.plugins.data.text_mmap import TextMemMapConfig, TextMemMapSource
from tests.helpers.bert_files import write_documents as write_corpus

M32, M64 = (1 << 32) - 1, (1 << 64) - 1
FIELDS = ("tokens", "tokentype_ids", "padding_mask", "labels", "loss_mask", "is_random", "truncated")


# --- references ---------------------------------------------------------------------------


def textbook_mt32(seed):
    """Matsumoto & Nishimura's mt19937 (init_genrand), one output at a time."""
    mt = [seed & M32]
    for i in range(1, 624):
        mt.append((1812433253 * (mt[-1] ^ (mt[-1] >> 30)) + i) & M32)
    i = 624
    while True:
        if i == 624:
            for k in range(624):
                y = (mt[k] & 0x80000000) | (mt[(k + 1) % 624] & 0x7FFFFFFF)
                mt[k] = mt[(k + 397) % 624] ^ (y >> 1) ^ (0x9908B0DF if y & 1 else 0)
            i = 0
        y = mt[i]
        i += 1
        y ^= y >> 11
        y ^= (y << 7) & 0x9D2C5680
        y ^= (y << 15) & 0xEFC60000
        yield y ^ (y >> 18)


def textbook_mt64(seed):
    """mt19937-64 (init_genrand64), one output at a time."""
    mt = [seed & M64]
    for i in range(1, 312):
        mt.append((6364136223846793005 * (mt[-1] ^ (mt[-1] >> 62)) + i) & M64)
    i = 312
    while True:
        if i == 312:
            for k in range(312):
                x = (mt[k] & 0xFFFFFFFF80000000) | (mt[(k + 1) % 312] & 0x7FFFFFFF)
                mt[k] = mt[(k + 156) % 312] ^ (x >> 1) ^ (0xB5026F5AA96619E9 if x & 1 else 0)
            i = 0
        x = mt[i]
        i += 1
        x ^= (x >> 29) & 0x5555555555555555
        x ^= (x << 17) & 0x71D67FFFEDA60000
        x ^= (x << 37) & 0xFFF7EEE000000000
        yield x ^ (x >> 43)


def reference_map(doc_idx, sizes, max_num_samples, max_len, short_seq_prob, seed, min_num_sent):
    """helpers.cpp build_mapping, transcribed loop for loop."""
    ratio = int(1.0 / short_seq_prob + 0.5) if short_seq_prob > 0 else 0
    gen = textbook_mt32(seed)

    def target():
        if ratio == 0:
            return max_len
        r = next(gen)
        return 2 + r % (max_len - 1) if r % ratio == 0 else max_len

    rows = []
    while len(rows) < max_num_samples:
        for d in range(len(doc_idx) - 1):
            first, last = doc_idx[d], doc_idx[d + 1]
            remain = last - first
            long = remain > 1 and any(sizes[k] > 512 for k in range(first, last))
            if remain < min_num_sent or long:
                continue
            prev, seq_len, num_sent, t = first, 0, 0, target()
            for k in range(first, last):
                seq_len += sizes[k]
                num_sent += 1
                remain -= 1
                if (seq_len >= t and remain > 1 and num_sent >= min_num_sent) or remain == 0:
                    rows.append([prev, k + 1, t, d])
                    prev, seq_len, num_sent, t = k + 1, 0, 0, target()
    gen64 = textbook_mt64(seed + 1)
    for i in range(len(rows) - 1, 0, -1):
        j = next(gen64) % (i + 1)
        rows[i], rows[j] = rows[j], rows[i]
    return rows


def reference_sample(sentences, target, seq_length, seed, idx, ids, binary_head=True, p=0.15):
    """One sample as Megatron-LM's legacy BertDataset builds it, step by step."""
    rng = np.random.RandomState((seed + idx) % 2**32)
    # step 2: segments
    if binary_head:
        a_end = 1
        if len(sentences) >= 3:
            a_end = rng.randint(1, len(sentences))
        tokens_a = sum(sentences[:a_end], [])
        tokens_b = sum(sentences[a_end:], [])
        is_random = rng.random() < 0.5
        if is_random:
            tokens_a, tokens_b = tokens_b, tokens_a
    else:
        tokens_a, tokens_b, is_random = sum(sentences, []), [], False
    # step 3: truncation
    truncated = len(tokens_a) + len(tokens_b) > target
    while len(tokens_a) + len(tokens_b) > target:
        longer = tokens_a if len(tokens_a) > len(tokens_b) else tokens_b
        if rng.random() < 0.5:
            del longer[0]
        else:
            del longer[-1]
    # step 4: [CLS] A [SEP] B [SEP]
    tokens = [ids["[CLS]"]] + tokens_a + [ids["[SEP]"]]
    types = [0] * len(tokens)
    if tokens_b:
        tokens += tokens_b + [ids["[SEP]"]]
        types += [1] * (len(tokens_b) + 1)
    # step 5: masking
    inv = {v: k for k, v in ids.items()}
    cands = []
    for i, t in enumerate(tokens):
        if t in (ids["[CLS]"], ids["[SEP]"]):
            continue
        if cands and inv[t].startswith("##"):
            cands[-1].append(i)
        else:
            cands.append([i])
    num_to_predict = min(p * target, max(1, int(round(len(tokens) * p))))
    pvals = np.array([1.0, 1 / 2, 1 / 3])
    pvals /= pvals.sum()
    table = [[cands[c:c + 1], cands[c:c + 2], cands[c:c + 3]] for c in range(len(cands))]
    rng.shuffle(table)
    out, masked, covered = list(tokens), [], set()
    for entry in table:
        if len(masked) >= num_to_predict:
            break
        n = rng.choice(np.array([1, 2, 3]), p=pvals / pvals.sum())
        chosen = [i for word in entry[n - 1] for i in word]
        while len(masked) + len(chosen) > num_to_predict and n > 1:
            n -= 1
            chosen = [i for word in entry[n - 1] for i in word]
        if len(masked) + len(chosen) > num_to_predict or covered.intersection(chosen):
            continue
        for i in chosen:
            covered.add(i)
            if rng.random() < 0.8:
                out[i] = ids["[MASK]"]
            elif rng.random() < 0.5:
                pass
            else:
                out[i] = rng.randint(0, len(ids))
            masked.append((i, tokens[i]))
    masked.sort()
    # step 6: pad
    pad = seq_length - len(out)
    labels, loss_mask = [-1] * seq_length, [0] * seq_length
    for i, t in masked:
        labels[i], loss_mask[i] = t, 1
    return {"tokens": out + [ids["[PAD]"]] * pad, "tokentype_ids": types + [0] * pad,
            "padding_mask": [1] * len(out) + [0] * pad, "labels": labels, "loss_mask": loss_mask,
            "is_random": int(is_random), "truncated": int(truncated)}


# --- fixtures: a vocabulary and documents whose origin each token tells ------------------------

STEMS = [f"w{d}x{k}" for d in range(40) for k in range(3)]  # document d writes only w{d}x*
SUFFIXES = ["##ing", "##ed", "##s", "##er"]


@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("bert") / "vocab.txt"
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + STEMS + SUFFIXES + ["."]) + "\n")
    return path


@pytest.fixture(scope="module")
def tokenizer(vocab_file):
    from mega.plugins.tokenizers.wordpiece import WordPieceTokenizer

    return WordPieceTokenizer(vocab_file, lower=True)


@pytest.fixture(scope="module")
def ids(vocab_file):
    return {t: i for i, t in enumerate(vocab_file.read_text().splitlines())}


def samples(tmp_path, tokenizer, seq_length=32, num_samples=200, seed=1234, **objective):
    corpus = write_corpus(tmp_path / "corpus.txt")
    docs = TokenizedDocuments(read_documents(TextMemMapIndex(corpus), "line"), tokenizer)
    return docs, BertSamples(docs, tokenizer, seq_length, num_samples, seed, BertObjective(**objective))


def doc_of(token_id, inv):
    piece = inv[token_id]
    return int(piece[1:piece.index("x")]) if piece.startswith("w") else None


# --- random streams and the sample map ----------------------------------------------------------


def test_mersenne_twisters_match_the_cpp_standard_and_the_textbook():
    g32, g64 = MT19937(5489), MT19937_64(5489)
    assert [g32.next() for _ in range(10000)][-1] == 4123659995  # [rand.predef] of the C++ standard
    assert int(g64.draws(10000)[-1]) == 9981545732273789042
    ref32, ref64, g32, g64 = textbook_mt32(1234), textbook_mt64(1235), MT19937(1234), MT19937_64(1235)
    assert [g32.next() for _ in range(5000)] == [next(ref32) for _ in range(5000)]
    assert [int(x) for x in g64.draws(700)] + [int(x) for x in g64.draws(300)] == [next(ref64) for _ in range(1000)]


def test_sample_map_walked_by_hand():
    # doc 0: sizes 5 5 5 5, target 12 -> the sum reaches 15 with one sentence left: keep going, emit all four.
    # doc 1: one sentence, skipped (a binary head needs two).
    # doc 2: sizes 8 x5 -> [8, 8] (16 >= 12, three left), then the rest [8, 8, 8].
    doc_idx, sizes = np.array([0, 4, 5, 10]), np.array([5, 5, 5, 5, 9] + [8] * 5)
    table = build_sample_map(doc_idx, sizes, 3, 12, 0.0, 1234, 2, shuffle=False)
    assert table.tolist() == [[0, 4, 12, 0], [5, 7, 12, 2], [7, 10, 12, 2]]
    table = build_sample_map(doc_idx, sizes, 3, 12, 0.0, 1234, 1, shuffle=False)  # no binary head: doc 1 counts
    assert table.tolist() == [[0, 4, 12, 0], [4, 5, 12, 1], [5, 7, 12, 2], [7, 10, 12, 2]]
    # more samples than one epoch holds: whole epochs again
    assert len(build_sample_map(doc_idx, sizes, 4, 12, 0.0, 1234, 2, shuffle=False)) == 6


def test_sample_map_equals_the_transcribed_cpp():
    doc_idx, sizes = golden_documents()
    for seed, ssp, min_sent, n in ((1234, 0.1, 2, 500), (7, 0.4, 1, 300), (99, 0.0, 2, 50)):
        ours = build_sample_map(doc_idx, sizes, n, 61, ssp, seed, min_sent)
        assert ours.tolist() == reference_map(list(doc_idx), list(sizes), n, 61, ssp, seed, min_sent)
    short = build_sample_map(doc_idx, sizes, 2000, 61, 0.1, 1234, 2)[:, 2]
    assert 0.05 < (short < 61).mean() < 0.15  # short_seq_prob 0.1


# Numbers produced by megatron-core 0.16.1 (its compiled helpers_cpp.build_mapping, and
# BERTMaskedWordPieceDataset.__getitem__ over the same sentences, vocabulary and map) on
# the inputs the tests below build. Only the numbers are kept here.
MCORE_MAP_ROWS = [[139, 142, 61], [180, 184, 61], [169, 171, 61], [54, 57, 61], [72, 75, 61], [213, 216, 61]]
MCORE_MAP_LENGTHS = {(1234, 0.1, 2, 500): 524, (7, 0.4, 1, 300): 347, (99, 0.0, 2, 50): 74, (1234, 0.1, 2, 5000): 5037}
MCORE_SAMPLES = [  # (map row, text, types, labels, is_random, truncated) of samples 0, 1, 2
    ([111, 115, 29],
     [2, 125, 90, 128, 89, 127, 89, 126, 129, 91, 89, 89, 126, 4, 128, 91, 3, 91, 128, 91, 128, 90, 90, 127, 89, 91, 90,
      90, 125, 4, 4, 3],
     [0] * 17 + [1] * 15,
     [-1] * 13 + [91, 128] + [-1] * 14 + [91, 128, -1], 0, 1),
    ([80, 82, 29],
     [2, 60, 128, 61, 4, 4, 61, 126, 4, 129, 3, 61, 125, 59, 128, 61, 125, 59, 128, 61, 128, 61, 128, 60, 61, 129, 3]
     + [0] * 5,
     [0] * 11 + [1] * 16 + [0] * 5,
     [-1, -1, -1, 61, 61, 127, -1, -1, 59] + [-1] * 23, 0, 0),
    ([103, 105, 29],
     [2, 4, 4, 4, 82, 82, 128, 82, 126, 4, 3, 81, 125, 80, 126, 82, 125, 81, 127, 82, 127, 81, 125, 129, 3] + [0] * 7,
     [0] * 11 + [1] * 14 + [0] * 7,
     [-1, 82, 126, 80, -1, -1, -1, -1, -1, 129] + [-1] * 22, 1, 0),
]
MCORE_CHECKSUM = 22748258  # sum over the 337 samples of text.(1..32) + 7 labels.(1..32) + 3 is_random + 5 truncated


def golden_documents():
    rnd = random.Random(5)
    counts = [rnd.randint(0, 9) for _ in range(60)]
    doc_idx = np.concatenate([[0], np.cumsum(counts)])
    sizes = np.array([rnd.randint(1, 40) for _ in range(doc_idx[-1])])
    sizes[7] = 600  # a long sentence: its document is skipped
    return doc_idx, sizes


def test_sample_map_equals_megatron_core():
    doc_idx, sizes = golden_documents()
    for (seed, ssp, min_sent, n), length in MCORE_MAP_LENGTHS.items():
        table = build_sample_map(doc_idx, sizes, n, 61, ssp, seed, min_sent)
        assert len(table) == length
        if (seed, n) == (1234, 500):
            assert table[:6, :3].tolist() == MCORE_MAP_ROWS


def test_samples_equal_megatron_core(tmp_path, tokenizer):
    """Megatron-core computes padding_mask as `tokens != [PAD]` after masking (a random
    replacement can be [PAD]); the legacy BertDataset and we use the real length."""
    _, ds = samples(tmp_path, tokenizer, seq_length=32, num_samples=300)
    assert len(ds) == 337
    for idx, (row, text, types, labels, is_random, truncated) in enumerate(MCORE_SAMPLES):
        s = ds[idx]
        assert ds.map[idx, :3].tolist() == row
        assert (s["tokens"].tolist(), s["tokentype_ids"].tolist(), s["labels"].tolist()) == (text, types, labels)
        assert (int(s["is_random"]), int(s["truncated"])) == (is_random, truncated)
    weights = torch.arange(1, 33)
    total = 0
    for idx in range(len(ds)):
        s = ds[idx]
        total += int((s["tokens"] * weights).sum() + 7 * (s["labels"] * weights).sum() + 3 * s["is_random"] + 5 * s["truncated"])
    assert total == MCORE_CHECKSUM


# --- one sample ----------------------------------------------------------------------------------


@pytest.mark.parametrize("head", ["sop", None])
def test_samples_equal_the_step_by_step_transcription(tmp_path, tokenizer, ids, head):
    docs, ds = samples(tmp_path, tokenizer, seq_length=32, num_samples=150, binary_head=head)
    for idx in range(len(ds)):
        start, end, target, _ = ds.map[idx]
        sentences = [docs.sentence(k) for k in range(start, end)]
        sample = ds[idx]
        got = {k: v.tolist() for k, v in sample.items() if k in FIELDS}  # Megatron's fields; lm_positions: mega's
        predicted = sample["loss_mask"].nonzero().flatten().tolist()
        assert sample["lm_positions"].tolist() == predicted + [0] * (len(sample["lm_positions"]) - len(predicted))
        assert got == reference_sample(sentences, int(target), 32, 1234, idx, ids, binary_head=head is not None), idx


def test_fields_shapes_and_layout(tmp_path, tokenizer, ids):
    _, ds = samples(tmp_path, tokenizer, seq_length=32)
    for idx in range(50):
        s = ds[idx]
        assert set(s) == set(FIELDS) | {"lm_positions"} and s["lm_positions"].shape == (5,)  # ceil(32 x 0.15)
        assert all(v.dtype == torch.int64 for v in s.values())
        assert all(s[k].shape == (32,) for k in FIELDS[:5]) and s["is_random"].shape == () == s["truncated"].shape
        n = int(s["padding_mask"].sum())
        assert s["padding_mask"][:n].eq(1).all() and s["padding_mask"][n:].eq(0).all()
        original = torch.where(s["loss_mask"].bool(), s["labels"], s["tokens"])
        seps = (original[:n] == ids["[SEP]"]).nonzero().flatten().tolist()
        assert original[0] == ids["[CLS]"] and len(seps) == 2 and seps[1] == n - 1
        types = [0] * (seps[0] + 1) + [1] * (n - seps[0] - 1) + [0] * (32 - n)
        assert s["tokentype_ids"].tolist() == types
        assert (s["tokens"][n:] == ids["[PAD]"]).all()
        assert ((s["labels"] >= 0) == s["loss_mask"].bool()).all()
        assert not s["loss_mask"][original == ids["[CLS]"]].any() and not s["loss_mask"][original == ids["[SEP]"]].any()


def test_single_segment_without_a_binary_head(tmp_path, tokenizer, ids):
    _, ds = samples(tmp_path, tokenizer, binary_head=None)
    for idx in range(30):
        s = ds[idx]
        n = int(s["padding_mask"].sum())
        original = torch.where(s["loss_mask"].bool(), s["labels"], s["tokens"])
        assert (original[:n] == ids["[SEP]"]).nonzero().flatten().tolist() == [n - 1]
        assert s["tokentype_ids"].eq(0).all() and s["is_random"] == 0


def test_masking_statistics_and_whole_words(tmp_path, tokenizer, ids):
    _, ds = samples(tmp_path, tokenizer, seq_length=64, num_samples=1500)
    inv = {v: k for k, v in ids.items()}
    masked = real = as_mask = kept = 0
    for idx in range(len(ds)):
        s = ds[idx]
        lm = s["loss_mask"].bool()
        original = torch.where(lm, s["labels"], s["tokens"])
        masked += int(lm.sum())
        real += int(s["padding_mask"].sum())
        as_mask += int((s["tokens"][lm] == ids["[MASK]"]).sum())
        kept += int((s["tokens"][lm] == s["labels"][lm]).sum())
        # a ## piece is masked with the piece before it ([CLS]/[SEP] aside: Megatron groups a
        # truncated word's tail at the start of B with A's last word, and one after [CLS] alone)
        pieces = [i for i in range(int(s["padding_mask"].sum())) if inv[int(original[i])] not in ("[CLS]", "[SEP]")]
        for prev, i in zip(pieces, pieces[1:]):
            if inv[int(original[i])].startswith("##"):
                assert lm[i] == lm[prev], (idx, i)
    assert 0.13 < masked / real < 0.16, masked / real
    assert abs(as_mask / masked - 0.8) < 0.03 and abs(kept / masked - 0.1) < 0.025, (as_mask / masked, kept / masked)


def test_sop_swaps_half_the_time_within_one_document(tmp_path, tokenizer, ids):
    _, ds = samples(tmp_path, tokenizer, num_samples=600)
    inv = {v: k for k, v in ids.items()}
    labels = []
    for idx in range(len(ds)):
        s = ds[idx]
        original = torch.where(s["loss_mask"].bool(), s["labels"], s["tokens"])
        origins = {doc_of(int(t), inv) for t in original[s["padding_mask"].bool()]} - {None}
        assert len(origins) == 1  # A and B from the one document
        labels.append(int(s["is_random"]))
    assert 0.45 < np.mean(labels) < 0.55


def test_nsp_takes_b_from_another_document(tmp_path, tokenizer, ids):
    _, ds = samples(tmp_path, tokenizer, num_samples=600, binary_head="nsp")
    inv = {v: k for k, v in ids.items()}
    labels = []
    for idx in range(len(ds)):
        s = ds[idx]
        original = torch.where(s["loss_mask"].bool(), s["labels"], s["tokens"])
        types = s["tokentype_ids"]
        real = s["padding_mask"].bool()
        a = {doc_of(int(t), inv) for t in original[real & (types == 0)]} - {None}
        b = {doc_of(int(t), inv) for t in original[real & (types == 1)]} - {None}
        own = {int(ds.map[idx][3])}
        assert a <= own  # A is the mapped document's (a segment may be all "." and ## pieces)
        assert len(b) <= 1 and (b.isdisjoint(own) if s["is_random"] else b <= own)
        labels.append(int(s["is_random"]))
    assert 0.45 < np.mean(labels) < 0.55


def test_a_sample_is_a_pure_function_of_index_and_seed(tmp_path, tokenizer):
    _, one = samples(tmp_path, tokenizer)
    _, two = samples(tmp_path, tokenizer)
    _, other = samples(tmp_path, tokenizer, seed=4321)
    for idx in (0, 7, 199, 3):
        a, b = one[idx], two[idx]
        assert all(torch.equal(a[k], b[k]) for k in FIELDS)
    assert any(not torch.equal(one[i]["tokens"], other[i]["tokens"]) for i in range(5))


# --- sentences and the text_mmap source ------------------------------------------------------


def test_punctuation_splitter():
    text = 'He said "Stop." Then 3 cats left! Did they? yes they did. e.g. this. "Quoted" one.(x) 東京です。次の文'
    assert split_sentences(text) == ['He said "Stop."', "Then 3 cats left!", "Did they? yes they did. e.g. this.",
                                     '"Quoted" one.(x) 東京です。', "次の文"]


def test_layouts(tmp_path):
    lines = tmp_path / "lines.txt"
    lines.write_text("First one.\nSecond one.\n\nOther doc.\r\n\r\n  \nThird doc. Two sentences.\n")
    assert read_documents(TextMemMapIndex(lines), "auto") == [["First one.", "Second one."], ["Other doc."],
                                                              ["Third doc. Two sentences."]]
    plain = tmp_path / "plain.txt"
    plain.write_text("Doc one. It has two sentences.\nDoc two has one\n")
    assert read_documents(TextMemMapIndex(plain), "auto") == [["Doc one.", "It has two sentences."], ["Doc two has one"]]
    assert read_documents(TextMemMapIndex(plain), "line") == [["Doc one. It has two sentences.", "Doc two has one"]]
    with pytest.raises(ConfigError, match="model.data.sentence_split='words'"):
        read_documents(TextMemMapIndex(plain), "words")


def test_text_mmap_serves_bert_samples(tmp_path, tokenizer, plugins):
    corpus = write_corpus(tmp_path / "corpus.txt", num_docs=40)
    cfg = config_from_dict({"model": {"data": {"data_prefix": [str(corpus)], "splits_string": "80,20,0"}}},
                           plugins=plugins).model.data
    source = TextMemMapSource(cfg, tmp_path)
    train = source.dataset("train", tokenizer, 32, 64, 1234, BertObjective())
    valid = source.dataset("valid", tokenizer, 32, 16, 1234, BertObjective())
    assert len(train) == 64 and set(train[5]) == set(FIELDS) | {"lm_positions"}
    docs = TokenizedDocuments(read_documents(TextMemMapIndex(corpus), "line"), tokenizer)
    direct = BertSamples(docs.subset(0, 32), tokenizer, 32, 64, 1234, BertObjective())  # train = the first 32 docs
    assert all(torch.equal(train[i][k], direct[i][k]) for i in range(64) for k in FIELDS)  # Megatron's order
    assert valid[0]["tokens"].shape == (32,)
    whole = source.whole_split("valid", tokenizer, 32, 1234, BertObjective())  # `mega evaluate`: one epoch of the map
    one_epoch = BertSamples(docs.subset(32, 40), tokenizer, 32, None, 1234, BertObjective())
    assert len(whole) == len(one_epoch) == len(build_sample_map(docs.doc_bounds[32:41], docs.sizes, 1, 29, 0.1, 1234, 2))
    cfg = config_from_dict({"model": {"data": {"data_prefix": [str(corpus)], "splits_string": "35,1,4"}}},
                           plugins=plugins).model.data
    assert len(read_documents(TextMemMapIndex(corpus), "line")[35]) == 1  # no sentence pair in the valid split
    with pytest.raises(DataError, match=r"corpus.txt, valid split \(documents 35 to 35\): no document"):
        TextMemMapSource(cfg, tmp_path).dataset("valid", tokenizer, 32, 16, 1234, BertObjective())
    with pytest.raises(ConfigError, match="BERT samples need"):
        source.dataset("train", plugins.tokenizers.get("bytes").factory(None, [], None), 32, 8, 1234, BertObjective())


def test_documents_too_short_for_a_pair_are_a_clear_error(tmp_path, tokenizer):
    corpus = tmp_path / "c.txt"
    corpus.write_text("w0x0 w0x1 .\n\nw1x0 .\n")
    docs = TokenizedDocuments(read_documents(TextMemMapIndex(corpus), "line"), tokenizer)
    with pytest.raises(DataError, match="sentence_split"):
        BertSamples(docs, tokenizer, 32, 10, 1234, BertObjective())
    assert len(BertSamples(docs, tokenizer, 32, 10, 1234, BertObjective(binary_head=None))) >= 10
