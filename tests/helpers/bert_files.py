"""BERT files the tests build: NGC's megatron_bert_345m release layout, Google's vocab.txt shape, documents of sentences."""
from __future__ import annotations

import argparse
import random
import zipfile
from pathlib import Path

import torch


MEGA_BERT = {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "ffn_hidden_size": 64,
             "max_position_embeddings": 32, "seq_length": 16, "make_vocab_size_divisible_by": 8,
             "hidden_dropout": 0.0, "attention_dropout": 0.0}


NGC = {"uncased": (30522, 30592, "BertWordPieceLowerCase"), "cased": (28996, 29056, "BertWordPieceCase")}


NGC_SHAPE = {"hidden": 16, "heads": 2, "layers": 2, "ffn": 64, "positions": 32}


def google_vocab(path: Path, entries: int) -> Path:
    """A vocab.txt of Google's BERT shape: [PAD]=0, [unused0..98], [UNK]=100, [CLS]=101,
    [SEP]=102, [MASK]=103, then word pieces."""
    head = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    path.write_text("\n".join(head + [f"w{i}" for i in range(entries - len(head))]) + "\n")
    return path


def ngc_zip(path: Path, kind: str, with_args: bool = True, seed: int = 0, **more_args) -> Path:
    """A zip of the NGC release's layout: `release/mp_rank_00/model_optim_rng.pt` (TP=1,
    the `release` iteration), no checkpoint_version (0: QKV rows as a Q block, a K block, a
    V block), Megatron-LM's pre-2021 key names (`transformer`, `attention.`), the
    vocabulary padded to 30592 / 29056 rows, `args` as Megatron-LM of that time saved them.
    Tiny widths; the tensors are random, built directly (not by mega)."""
    _, rows, tokenizer_type = NGC[kind]
    h, f, p, n = NGC_SHAPE["hidden"], NGC_SHAPE["ffn"], NGC_SHAPE["positions"], NGC_SHAPE["layers"]
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.1, base=0.0):
        return torch.randn(*shape, generator=g) * scale + base

    encoder = {}
    for i in range(n):
        pre = f"layers.{i}."
        encoder.update({
            pre + "input_layernorm.weight": r(h, base=1.0), pre + "input_layernorm.bias": r(h),
            pre + "attention.query_key_value.weight": r(3 * h, h), pre + "attention.query_key_value.bias": r(3 * h),
            pre + "attention.dense.weight": r(h, h), pre + "attention.dense.bias": r(h),
            pre + "post_attention_layernorm.weight": r(h, base=1.0), pre + "post_attention_layernorm.bias": r(h),
            pre + "mlp.dense_h_to_4h.weight": r(f, h), pre + "mlp.dense_h_to_4h.bias": r(f),
            pre + "mlp.dense_4h_to_h.weight": r(h, f), pre + "mlp.dense_4h_to_h.bias": r(h),
        })
    encoder.update({"final_layernorm.weight": r(h, base=1.0), "final_layernorm.bias": r(h)})
    model = {
        "language_model": {
            "embedding": {"word_embeddings": {"weight": r(rows, h)}, "position_embeddings": {"weight": r(p, h)},
                          "tokentype_embeddings": {"weight": r(2, h)}},
            "transformer": encoder,
            "pooler": {"dense.weight": r(h, h), "dense.bias": r(h)},
        },
        "lm_head": {"bias": r(rows), "dense.weight": r(h, h), "dense.bias": r(h), "layernorm.weight": r(h, base=1.0),
                    "layernorm.bias": r(h)},
        "binary_head": {"weight": r(2, h), "bias": r(2)},
    }
    state = {"model": model, "iteration": 0}
    if with_args:
        state["args"] = argparse.Namespace(
            num_layers=n, hidden_size=h, num_attention_heads=NGC_SHAPE["heads"], max_position_embeddings=p,
            seq_length=p, model_parallel_size=1, tokenizer_type=tokenizer_type,
            vocab_file="/workspace/data/bert-vocab.txt", make_vocab_size_divisible_by=128, padded_vocab_size=rows,
            hidden_dropout=0.1, attention_dropout=0.1, layernorm_epsilon=1e-5, init_method_std=0.02,
            fp16=True, bert_load=None, load="release", save=None, seed=1234, **more_args)
    member = path.parent / "model_optim_rng.pt"
    torch.save(state, member)
    with zipfile.ZipFile(path, "w") as z:
        z.write(member, "release/mp_rank_00/model_optim_rng.pt")
        z.writestr("latest_checkpointed_iteration.txt", "release")
    member.unlink()
    return path


def write_documents(path, num_docs=40, seed=0):
    """One sentence per line, a blank line between documents; document d uses its own stems."""
    rnd = random.Random(seed)
    docs = []
    for d in range(num_docs):
        sentences = []
        for _ in range(rnd.randint(1, 7)):
            words = [rnd.choice([f"w{d}x{k}" for k in range(3)]) + rnd.choice(["", "", "ing", "ed", "s", "er"])
                     for _ in range(rnd.randint(2, 12))]
            sentences.append(" ".join(words) + " .")
        docs.append("\n".join(sentences))
    path.write_text("\n\n".join(docs) + "\n")
    return path


WORDS = ["the", "a", "model", "reads", "token", "##s", "##ing", "bert", "layer", "norm", "head", "mask", "word",
         "piece", "cat", "dog", "run", "##ner", ".", ",", "!", "?", "is", "was", "on", "in", "of", "and"]
