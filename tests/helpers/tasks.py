"""Tiny hand-written files of every fine-tuning task in its real format, and the experiment that trains on them."""
from __future__ import annotations

import json
from pathlib import Path

from mega.cli import main


WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "?", "<", ">", "@", "$", "the", "a", "bridge", "was",
         "built", "in", "1895", "who", "when", "john", "smith", "played", "denver", "paris", "mary", "jones", "lives",
         "works", "at", "acme", "movie", "film", "good", "great", "bad", "awful", "very", "it", "is", "chemical",
         "gene", "inhibits", "activates", "binds", "cat", "dog", "sat", "ran", "barked", "meowed", "and", "then"]


CONTEXT = "the bridge was built in 1895 . john smith played in denver ."


def task_files(d: Path) -> dict:
    d.mkdir(parents=True, exist_ok=True)
    (d / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    squad = {"version": "1.1", "data": [{"title": "t", "paragraphs": [{"context": CONTEXT, "qas": [
        {"id": "q1", "question": "when was the bridge built ?", "answers": [{"text": "1895", "answer_start": CONTEXT.index("1895")}]},
        {"id": "q2", "question": "who played in denver ?", "answers": [{"text": "john smith", "answer_start": CONTEXT.index("john")}]}]}]}]}
    (d / "squad.json").write_text(json.dumps(squad))
    (d / "sentiment.tsv").write_text("sentence\tlabel\n" + "".join(
        f"{a} {b} {c}\t{l}\n" for a in ("the", "a") for b in ("movie", "film") for c, l in
        (("good", 1), ("great", 1), ("bad", 0), ("awful", 0))))
    (d / "labels.txt").write_text("negative\npositive\n")
    ner = d / "ner"
    ner.mkdir(exist_ok=True)
    sents = [("john smith lives in paris", "B-PER I-PER O O B-LOC"), ("mary jones works at acme", "B-PER I-PER O O B-ORG"),
             ("the cat sat in denver", "O O O O B-LOC"), ("john works in paris", "B-PER O O B-LOC")]
    for name in ("train", "dev"):
        (ner / f"text_{name}.txt").write_text("".join(s + "\n" for s, _ in sents))
        (ner / f"labels_{name}.txt").write_text("".join(l + "\n" for _, l in sents))
    (d / "chemprot.tsv").write_text("".join(f"{t}\t{i}\n" for t, i in [
        ("<@CHEMICAL$> inhibits <@GENE$> .", 0), ("<@CHEMICAL$> activates <@GENE$> .", 1),
        ("<@CHEMICAL$> and <@GENE$> .", 2), ("the <@CHEMICAL$> inhibits the <@GENE$>", 0),
        ("a <@CHEMICAL$> activates a <@GENE$>", 1), ("<@CHEMICAL$> , then <@GENE$>", 2)]))
    (d / "label_mapping.tsv").write_text("CPR:4\t0\nCPR:3\t1\nFalse\t2\n")
    rows = [("the cat", "it", ["meowed", "barked", "built", "played"], 0), ("the dog", "it", ["meowed", "barked", "built", "played"], 1),
            ("john", "he", ["barked", "meowed", "played", "built"], 2)]
    (d / "swag.csv").write_text("video-id,fold-ind,startphrase,sent1,sent2,gold-source,ending0,ending1,ending2,ending3,label\n" + "".join(
        f"v,0,x,{a},{b},gold,{','.join(e)},{l}\n" for a, b, e, l in rows))
    return {"dir": d}


def task_raw(d: Path, tmp: Path, name: str, model: dict, steps: int = 40) -> dict:
    return {
        "trainer": {"max_steps": steps, "val_check_interval": steps, "limit_val_batches": 1, "log_every_n_steps": 10,
                    "enable_progress_bar": False, "accelerator": "cpu"},
        "exp_manager": {"exp_dir": str(tmp / "results"), "name": name, "loggers": ["jsonl"]},
        "model": {"micro_batch_size": 4, "seed": 1,
                  "language_model": {"config": {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4,
                                                "max_position_embeddings": 64, "hidden_dropout": 0.0,
                                                "attention_dropout": 0.0}},
                  "tokenizer": {"library": "wordpiece", "vocab_file": str(d / "vocab.txt")},
                  "optim": {"lr": 5e-3, "sched": {"name": "constant"}}, **model},
    }


def predict(capsys, *args) -> dict:
    capsys.readouterr()
    assert main(["predict", *map(str, args)]) == 0
    return json.loads(capsys.readouterr().out)
