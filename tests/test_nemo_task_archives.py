"""NeMo's Megatron-BERT archives, both ways: NeMo 1.4's fine-tuned task models
(TokenClassificationModel, TextClassificationModel, QAModel on MegatronBertEncoder) and
NeMo 1.23's MegatronBertModel.

Archives are built here as NeMo's save code builds them (tests/nemo_archives.py), from a
randomly initialised Megatron-BERT encoder and NeMo heads whose logits this file computes by
hand from NeMo's MultiLayerPerceptron (dropout, linear, activation, ..., linear); imported,
the model computes those logits. At TP=1 and TP=2, plain and gzipped, with Megatron-LM's
current names and QKV order and with the pre-2021 ones (`transformer`, `attention`,
checkpoint_version 0). mega -> .nemo -> mega gives the same logits; a `.nemo` works where a
checkpoint goes (`mega evaluate`, `mega predict`, `lm_checkpoint`); malformed archives are
refused naming the member, writing nothing."""
from __future__ import annotations

import io
import json
import re
import tarfile

import pytest
import torch
import yaml

from mega.cli import main
from mega.checkpoint import restore
from mega.config import config_from_dict
from mega.errors import CheckpointError
from tests.nemo_archives import old_megatron_names, pad_rows, padded, qkv_to_version0, rewrite, split, write_nemo
from tests.test_downstream_tasks import WORDS, _files, _raw

H, HEADS, LAYERS, POS = 32, 4, 2, 64
VOCAB = len(WORDS)
NLP = "nemo.collections.nlp.models."
TARGET = {"token_classification": NLP + "token_classification.token_classification_model.TokenClassificationModel",
          "text_classification": NLP + "text_classification.text_classification_model.TextClassificationModel",
          "question_answering": NLP + "question_answering.qa_model.QAModel"}
LABELS = {"O": 0, "B-LOC": 1, "B-ORG": 2, "B-PER": 3, "I-PER": 4}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _files(tmp_path_factory.mktemp("nemo-tasks"))["dir"]


@pytest.fixture(scope="module")
def encoder(data, plugins):
    """A Megatron-BERT as NeMo 1.4's Megatron-LM runs it (exact GELU, eps 1e-5, 2 token types)."""
    raw = {"model": {"name": "bert", "num_layers": LAYERS, "hidden_size": H, "num_attention_heads": HEADS,
                     "max_position_embeddings": POS, "seq_length": 16, "activation": "gelu", "layernorm_epsilon": 1e-5,
                     "make_vocab_size_divisible_by": 8, "hidden_dropout": 0.0, "attention_dropout": 0.0,
                     "tokenizer": {"library": "wordpiece", "vocab_file": str(data / "vocab.txt")}}}
    mc = config_from_dict(raw, plugins=plugins).model
    tok = plugins.tokenizers.get("wordpiece").factory(mc.tokenizer, [], None)
    torch.manual_seed(3)
    model = plugins.models.get("bert").factory(mc, tok, plugins).eval()
    with torch.no_grad():  # LayerNorms and biases away from their init, so a swapped name shows
        for name, p in model.named_parameters():
            if "layernorm" in name or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


BATCH = {"tokens": torch.randint(5, VOCAB, (3, 16), generator=torch.Generator().manual_seed(1)),
         "tokentype_ids": torch.cat([torch.zeros(3, 8, dtype=torch.long), torch.ones(3, 8, dtype=torch.long)], 1),
         "padding_mask": torch.ones(3, 16, dtype=torch.long)}
BATCH["padding_mask"][1, 12:] = 0


def _hidden(encoder):
    with torch.no_grad():
        return encoder.logits(BATCH)["last_hidden_state"]


def _mlp(layers, seed, out, act=torch.relu):
    """NeMo's MultiLayerPerceptron weights (`classifier.mlp.layer{2i}`) and its forward."""
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for i in range(layers):
        rows = out if i == layers - 1 else H
        weights[f"classifier.mlp.layer{2 * i}.weight"] = torch.randn(rows, H, generator=g) * 0.2
        weights[f"classifier.mlp.layer{2 * i}.bias"] = torch.randn(rows, generator=g) * 0.1

    def forward(h):
        for i in range(layers):
            h = torch.nn.functional.linear(h, weights[f"classifier.mlp.layer{2 * i}.weight"],
                                           weights[f"classifier.mlp.layer{2 * i}.bias"])
            if i < layers - 1:
                h = act(h)
        return h
    return weights, forward


# the NeMo head of each task (its yaml section, its weights) and the logits it computes
def _head(task, variant):
    if task == "token_classification":
        layers, act = (2, "relu") if variant == 0 else (3, "tanh")
        weights, f = _mlp(layers, 11, len(LABELS), getattr(torch, act))
        section = {"head": {"num_fc_layers": layers, "fc_dropout": 0.5, "activation": act, "use_transformer_init": True}}
        return section, weights, lambda h: {"logits": f(h)}
    if task == "text_classification":
        weights, f = _mlp(2, 12, 3)
        return {"classifier_head": {"num_output_layers": 2, "fc_dropout": 0.1}}, weights, lambda h: {"logits": f(h[:, 0])}
    layers, log_softmax = (1, False) if variant == 0 else (2, True)
    weights, f = _mlp(layers, 13, 2)
    section = {"token_classifier": {"num_layers": layers, "dropout": 0.0, "num_classes": 2, "activation": "relu",
                                    "log_softmax": log_softmax, "use_transformer_init": True}}
    # NeMo's log_softmax is over the classifier's last dimension: (start, end) of each token
    out = (lambda h: torch.log_softmax(f(h), -1)) if log_softmax else f
    return section, weights, lambda h: dict(zip(("start_logits", "end_logits"), out(h).unbind(-1)))


def _yaml(task, section, data):
    """model_config.yaml as NeMo 1.4 saves the task after training (artifact keys filled by write_nemo)."""
    cfg = {"tokenizer": {"tokenizer_name": "megatron-bert-uncased", "vocab_file": None, "tokenizer_model": None,
                         "special_tokens": None},
           "language_model": {"pretrained_model_name": "megatron-bert-uncased",
                              "lm_checkpoint": "/raid/ckpt/megatron_bert/model_optim_rng.pt", "config_file": None,
                              "config": None},
           "optim": {"name": "adam", "lr": 5e-5, "weight_decay": 0.0}, "target": TARGET[task], **section}
    if task == "token_classification":
        cfg.update(label_ids=dict(LABELS), class_labels={"class_labels_file": "label_ids.csv"},
                   dataset={"data_dir": str(data / "ner"), "class_balancing": None, "max_seq_length": 16,
                            "pad_label": "O", "ignore_extra_tokens": False, "ignore_start_end": False,
                            "use_cache": True, "num_workers": 2, "pin_memory": False, "drop_last": False},
                   train_ds={"text_file": "text_train.txt", "labels_file": "labels_train.txt", "shuffle": True,
                             "num_samples": -1, "batch_size": 64},
                   validation_ds={"text_file": "text_dev.txt", "labels_file": "labels_dev.txt", "shuffle": False,
                                  "num_samples": -1, "batch_size": 64})
    elif task == "text_classification":
        cfg.update(class_labels={"class_labels_file": None},
                   dataset={"num_classes": 3, "do_lower_case": False, "max_seq_length": 16, "class_balancing": None,
                            "use_cache": False},
                   train_ds={"file_path": "???", "batch_size": 64, "shuffle": True, "num_samples": -1}, infer_samples=[])
    else:
        cfg.update(dataset={"version_2_with_negative": False, "doc_stride": 8, "max_query_length": 8,
                            "max_seq_length": 32, "max_answer_length": 30, "null_score_diff_threshold": 0.0,
                            "n_best_size": 20, "do_lower_case": True, "use_cache": True},
                   train_ds={"file": str(data / "squad.json"), "batch_size": 24, "shuffle": True, "num_samples": -1})
    return cfg


def _encoder_state(encoder, tp, version, old_names):
    """The encoder under NeMo 1.4's `bert_model.` (no pooler), Megatron-LM's padding at TP."""
    state = {k: v.clone() for k, v in encoder.state_dict().items()
             if k.startswith("language_model.") and ".pooler." not in k}
    word = "language_model.embedding.word_embeddings.weight"
    state[word] = pad_rows(state[word][:VOCAB], padded(VOCAB, 128, tp))  # NeMo 1.4: 128 x TP, whatever the config
    shards = split(state, tp)
    out = []
    for shard in shards:
        fixed = {}
        for k, t in shard.items():
            if version == 0 and "query_key_value" in k:
                t = qkv_to_version0(t, HEADS // tp)
            fixed["bert_model." + (old_megatron_names(k) if old_names else k)] = t
        out.append(fixed)
    return out


def _artifacts(data, version, dashes):
    arch = ({"hidden-size": H, "num-attention-heads": HEADS, "num-layers": LAYERS, "max-seq-length": POS} if dashes
            else {"hidden_size": H, "num_attention_heads": HEADS, "num_layers": LAYERS, "max_position_embeddings": POS})
    config = {**arch, "vocab_file": "/raid/vocab/bert-large-uncased-vocab.txt", "tokenizer_type": "BertWordPieceLowerCase",
              "lazy_mpu_init": True, "onnx_safe": True}
    return {"tokenizer.vocab_file": ("vocab.txt", (data / "vocab.txt").read_bytes()),
            "language_model.config_file": ("megatron-bert-uncased_encoder_config.json",
                                           (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()),
            "megatron_checkpoint_version.json": ("megatron_checkpoint_version.json",
                                                 json.dumps({"checkpoint_version": float(version)}).encode())}


def build_task_archive(path, encoder, data, task, tp=1, gz=False, version=3, old_names=False, variant=0):
    """A NeMo 1.4 task `.nemo` and the logits NeMo computes for BATCH."""
    section, head, forward = _head(task, variant)
    shards = _encoder_state(encoder, tp, version, old_names)
    for shard in shards:  # NeMo's classifier is replicated: every rank saves it whole
        shard.update({k: v.clone() for k, v in head.items()})
    write_nemo(path, _yaml(task, section, data), shards, _artifacts(data, version, dashes=old_names), gz=gz)
    return forward(_hidden(encoder))


LAYOUTS = {"tp1": dict(tp=1, gz=False, version=3, old_names=False),
           "tp2-gz-v0-old": dict(tp=2, gz=True, version=0, old_names=True),
           "tp2": dict(tp=2, gz=False, version=3, old_names=False)}


def _assert_close(got, want):
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-5, msg=key)


@pytest.mark.parametrize("task", sorted(TARGET))
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_a_nemo_14_task_archive_imports_with_nemos_logits(encoder, data, tmp_path, plugins, task, layout):
    nemo = tmp_path / "task.nemo"
    want = build_task_archive(nemo, encoder, data, task, **LAYOUTS[layout])
    assert main(["import", str(nemo), str(tmp_path / "run")]) == 0
    model, tokenizer, config = restore(tmp_path / "run", plugins)
    _assert_close(model.logits(BATCH), want)
    mc = config.model
    assert mc.name == task and mc.tokenizer.library == "wordpiece" and mc.tokenizer.do_lower_case is True
    assert mc.language_model.config["num_layers"] == LAYERS and mc.language_model.config["activation"] == "gelu"
    if task == "token_classification":
        assert mc.dataset.label_ids == ["O", "B-LOC", "B-ORG", "B-PER", "I-PER"]  # NeMo's label_ids, by id
        assert (mc.head.num_fc_layers, mc.head.activation) == (2, "relu")
    if task == "text_classification":
        assert mc.dataset.num_classes == 3 and mc.classifier_head.num_output_layers == 2


def test_a_three_layer_tanh_token_head_and_a_log_softmax_qa_head(encoder, data, tmp_path, plugins):
    nemo = tmp_path / "ner.nemo"
    want = build_task_archive(nemo, encoder, data, "token_classification", variant=1)
    model, _, config = restore(nemo, plugins)  # straight from the file
    assert (config.model.head.num_fc_layers, config.model.head.activation) == (3, "tanh")
    _assert_close(model.logits(BATCH), want)
    nemo = tmp_path / "qa.nemo"
    want = build_task_archive(nemo, encoder, data, "question_answering", variant=1)
    model, _, config = restore(nemo, plugins)
    assert (config.model.token_classifier.num_layers, config.model.token_classifier.log_softmax) == (2, True)
    _assert_close(model.logits(BATCH), want)


def _train(plugins, data, tmp, name, model, steps=4):
    import mega

    cfg = config_from_dict(_raw(data, tmp, name, model, steps), [], plugins)
    return mega.run(cfg, plugins)


TASK_RUNS = {
    "token_classification": lambda d: {"name": "token_classification",
                                       "dataset": {"data_dir": str(d / "ner"), "max_seq_length": 16},
                                       "head": {"num_fc_layers": 2}},
    "token_classification_megatron_head": lambda d: {"name": "token_classification",
                                                     "dataset": {"data_dir": str(d / "ner"), "max_seq_length": 16}},
    "text_classification": lambda d: {"name": "text_classification", "train_ds": {"file_path": str(d / "sentiment.tsv")},
                                      "validation_ds": {"file_path": str(d / "sentiment.tsv")},
                                      "class_labels": {"class_labels_file": str(d / "labels.txt")},
                                      "dataset": {"num_classes": 2, "max_seq_length": 16},
                                      "classifier_head": {"num_output_layers": 2}},
    "relation_extraction": lambda d: {"name": "relation_extraction", "train_ds": {"file_path": str(d / "chemprot.tsv")},
                                      "validation_ds": {"file_path": str(d / "chemprot.tsv")},
                                      "class_labels": {"class_labels_file": str(d / "label_mapping.tsv")},
                                      "dataset": {"max_seq_length": 16}, "classifier_head": {"num_output_layers": 1}},
    "question_answering": lambda d: {"name": "question_answering", "train_ds": {"file": str(d / "squad.json")},
                                     "validation_ds": {"file": str(d / "squad.json")},
                                     "dataset": {"max_seq_length": 32, "doc_stride": 8, "max_query_length": 8}},
}


def _max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in ("logits", "start_logits", "end_logits") if k in a)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TASK_RUNS))
def test_a_fine_tuned_task_round_trips_through_nemo(data, tmp_path, plugins, name):
    """mega -> .nemo (TP=1 and resharded to TP=2; gzipped, as NeMo 1.4 reads them) -> mega: the same logits."""
    run = _train(plugins, data, tmp_path, name, TASK_RUNS[name](data))
    task = run.model.downstream_task
    from mega.runtime.collate import collate

    batch = collate(task.samples("valid", run.tokenizer)[:4])
    with torch.no_grad():
        want = run.model.eval().logits(batch)
    for tp in (1, 2):
        nemo = tmp_path / f"{name}{tp}.nemo"
        assert main(["export", str(run.run_dir), str(nemo), "--to", "nemo", "--option", f"tensor_parallel={tp}"]) == 0
        assert nemo.read_bytes()[:2] == b"\x1f\x8b"  # gzip: NeMo 1.4 opens r:gz only
        with tarfile.open(nemo) as tar:
            names = tar.getnames()
            cfg = yaml.safe_load(tar.extractfile("./model_config.yaml").read())
        assert names[0] == "." and all(n == "." or n.startswith("./") for n in names)  # tar.add(folder, arcname=".")
        weights = ["./model_weights.ckpt"] if tp == 1 else [f"./mp_rank_{r:02d}/model_weights.ckpt" for r in range(tp)]
        assert set(weights) <= set(names) and (tp == 1 or {"./mp_rank_00", "./mp_rank_01"} <= set(names))
        nemo_class = "text_classification" if name == "relation_extraction" else name.replace("_megatron_head", "")
        assert cfg["target"] == TARGET[nemo_class]  # BioMegatron's relation extraction is NeMo's text classification
        assert cfg["megatron_checkpoint_version"]["json"].startswith("nemo:")  # as NeMo registers it
        assert cfg["language_model"]["config_file"].startswith("nemo:") and cfg["tokenizer"]["vocab_file"].startswith("nemo:")
        model, _, _ = restore(nemo, plugins)
        with torch.no_grad():
            got = model.logits(batch)
        assert _max_diff(got, want) == 0.0, (name, tp)
    if name == "token_classification_megatron_head":  # mega's one linear layer is NeMo's one-layer head
        assert cfg["head"]["num_fc_layers"] == 1


def test_a_pooler_head_is_not_exported(data, tmp_path, plugins, capsys):
    run = _train(plugins, data, tmp_path, "tc", {**TASK_RUNS["text_classification"](data), "classifier_head": None}, 1)
    assert main(["export", str(run.run_dir), str(tmp_path / "tc.nemo"), "--to", "nemo"]) == 2
    assert "model.classifier_head: unset" in capsys.readouterr().err and not (tmp_path / "tc.nemo").exists()


def test_a_nemo_file_evaluates_predicts_and_fine_tunes_directly(encoder, data, tmp_path, plugins, capsys):
    nemo = tmp_path / "ner.nemo"
    build_task_archive(nemo, encoder, data, "token_classification")
    out = tmp_path / "eval.json"
    assert main(["evaluate", str(nemo), "--split", "valid", "--output", str(out),
                 f"model.dataset.data_dir={data / 'ner'}"]) == 0
    metrics = json.loads(out.read_text())
    assert {"f1", "token_accuracy", "label_macro_f1"} <= set(metrics)
    capsys.readouterr()
    assert main(["predict", str(nemo), "--text", "john smith lives in paris"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert len(answer["labels"]) == 5 and set(answer["labels"]) <= set(LABELS)
    # lm_checkpoint = a task .nemo: its encoder starts a new fine-tuning
    from mega.plugins.tasks.encoder import load_encoder

    raw = _raw(data, tmp_path, "qa", TASK_RUNS["question_answering"](data))
    raw["model"]["language_model"] = {"lm_checkpoint": str(nemo)}
    cfg = config_from_dict(raw, [], plugins)
    cfg.model.check(plugins)
    assert cfg.model.language_model.config["num_layers"] == LAYERS  # the archive described the encoder
    model = plugins.models.get("question_answering").factory(cfg.model, plugins.tokenizers.get("wordpiece").factory(
        cfg.model.tokenizer, [], None), plugins)
    load_encoder(model, str(nemo), plugins, cfg.model.tokenizer.vocab_file)
    for name, t in encoder.state_dict().items():
        if name.startswith("language_model.") and ".pooler." not in name:
            torch.testing.assert_close(model.state_dict()[name][:VOCAB], t[:VOCAB], rtol=0, atol=0)


# --- malformed archives: exit 2 naming the member, nothing written --------------------------------


def _drop(name):
    return lambda m, d: [] if m.name.endswith(name) else [(m, d)]


def _add(name, data):
    def change(m, d):
        yield m, d
        if m.name == "./model_config.yaml":
            info = tarfile.TarInfo(name)
            yield info, data
    return change


def _claim(name, size):
    def change(m, d):
        if m.name.endswith(name):
            m.size = size
        yield m, d
    return change


@pytest.mark.parametrize("how,expected", [
    ("no yaml", r"has no model_config.yaml"),
    ("rank missing", r"member mp_rank_01/model_weights.ckpt is missing \(the archive holds mp_rank_00, mp_rank_02\)"),
    ("extra head layer", r"no place for: mp_rank_00/model_weights.ckpt: classifier.mlp.layer4.weight"),
    ("escape", r"member \.\./evil.py: absolute, outside the archive"),
    ("link", r"member ./vocab-link is not a plain file"),
    ("no version file", None),
])
def test_a_malformed_task_archive_is_refused_naming_the_member(encoder, data, tmp_path, capsys, how, expected):
    good = tmp_path / "good.nemo"
    build_task_archive(good, encoder, data, "token_classification", tp=2, gz=True)
    bad = tmp_path / "bad.nemo"
    if how == "no yaml":
        rewrite(good, bad, _drop("model_config.yaml"))
    elif how == "rank missing":  # ranks 0 and 2 of three: the middle one gone
        def change(m, d):
            if "mp_rank_01" not in m.name:
                yield m, d
            if m.name == "./mp_rank_00/model_weights.ckpt":
                yield tarfile.TarInfo("./mp_rank_02/model_weights.ckpt"), d
        rewrite(good, bad, change)
    elif how == "extra head layer":
        def change(m, d):
            if m.name.endswith("model_weights.ckpt"):
                state = torch.load(io.BytesIO(d))
                state["classifier.mlp.layer4.weight"] = torch.zeros(2, H)
                buf = io.BytesIO()
                torch.save(state, buf)
                d = buf.getvalue()
            yield m, d
        rewrite(good, bad, change)
    elif how == "escape":
        rewrite(good, bad, _add("../evil.py", b"print('hi')"))
    elif how == "link":
        def change(m, d):
            yield m, d
            if m.name == "./model_config.yaml":
                info = tarfile.TarInfo("./vocab-link")
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                yield info, None
        rewrite(good, bad, change)
    else:  # NeMo 1.4 needs it for model-parallel archives; mega reads the weights as current Megatron-LM
        rewrite(good, bad, _drop("megatron_checkpoint_version.json"))
    code = main(["import", str(bad), str(tmp_path / "run")])
    err = capsys.readouterr().err
    if expected is None:
        assert code == 0
        return
    assert code == 2 and re.search(expected, err), err
    assert str(bad) in err and not (tmp_path / "run").exists() and not (tmp_path / "evil.py").exists()
    assert not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())


def test_a_member_claiming_absurd_size_is_refused_before_it_is_read(encoder, data, tmp_path, plugins):
    import tarfile as tf

    good = tmp_path / "good.nemo"
    build_task_archive(good, encoder, data, "token_classification")
    bad = tmp_path / "big.nemo"
    big = b"x" * (17 << 20)  # more than any yaml or JSON artifact can need
    rewrite(good, bad, lambda m, d: [(m, big if m.name.endswith("_encoder_config.json") else d)])
    with pytest.raises(CheckpointError, match=r"member .*_encoder_config.json claims 17825792 bytes, more than"):
        restore(bad, plugins)
    with tf.open(bad) as tar:
        assert tar.getmember(next(n for n in tar.getnames() if n.endswith("model_weights.ckpt")))


# --- NeMo 1.23's MegatronBertModel ---------------------------------------------------------------

BERT_MODEL = "nemo.collections.nlp.models.language_modeling.megatron_bert_model.MegatronBertModel"


def _bert_yaml(tp, binary=True):
    return {"mcore_bert": False, "micro_batch_size": 4, "global_batch_size": 8, "tensor_model_parallel_size": tp,
            "pipeline_model_parallel_size": 1, "encoder_seq_length": 16, "max_position_embeddings": POS,
            "position_embedding_type": "learned_absolute", "num_layers": LAYERS, "hidden_size": H,
            "ffn_hidden_size": 4 * H, "num_attention_heads": HEADS, "init_method_std": 0.02, "hidden_dropout": 0.1,
            "kv_channels": None, "apply_query_key_layer_scaling": True, "layernorm_epsilon": 1e-5,
            "make_vocab_size_divisible_by": 8, "bert_binary_head": binary, "bias_gelu_fusion": False,
            "tokenizer": {"library": "megatron", "type": "BertWordPieceLowerCase", "model": None, "vocab_file": None,
                          "merge_file": None},
            "precision": 32, "target": BERT_MODEL}


@pytest.mark.parametrize("tp,gz", [(1, False), (2, True)])
def test_a_megatron_bert_model_archive_imports_and_round_trips(encoder, data, tmp_path, plugins, tp, gz):
    state = {k: v.clone() for k, v in encoder.state_dict().items()}
    rows = padded(VOCAB, 8, tp)
    for k in ("language_model.embedding.word_embeddings.weight", "lm_head.bias"):
        state[k] = pad_rows(state[k][:VOCAB], rows)
    shards = [{"model." + k: v for k, v in s.items()} for s in split(state, tp, extra_column=("lm_head.bias",))]
    nemo = write_nemo(tmp_path / "bert.nemo", _bert_yaml(tp), shards,
                      {"tokenizer.vocab_file": ("vocab.txt", (data / "vocab.txt").read_bytes())}, gz=gz)
    assert main(["import", str(nemo), str(tmp_path / "run")]) == 0
    model, _, config = restore(tmp_path / "run", plugins)
    assert (config.model.name, config.model.activation, config.model.add_binary_head) == ("bert", "gelu", True)
    with torch.no_grad():
        got, want = model.logits(BATCH), encoder.logits(BATCH)
    torch.testing.assert_close(got["prediction_logits"][..., :VOCAB], want["prediction_logits"][..., :VOCAB], rtol=0, atol=1e-5)
    torch.testing.assert_close(got["seq_relationship_logits"], want["seq_relationship_logits"], rtol=0, atol=1e-5)
    # and back: mega -> .nemo -> mega
    out = tmp_path / "again.nemo"
    assert main(["export", str(tmp_path / "run"), str(out), "--to", "nemo", "--option", "tensor_parallel=2"]) == 0
    with tarfile.open(out) as tar:
        cfg = yaml.safe_load(tar.extractfile("./model_config.yaml").read())
        shard = torch.load(tar.extractfile("./mp_rank_01/model_weights.ckpt"), weights_only=True)
    assert cfg["target"] == BERT_MODEL and cfg["bias_gelu_fusion"] is False and cfg["tokenizer"]["type"] == "BertWordPieceLowerCase"
    assert shard["model.lm_head.bias"].shape[0] == padded(VOCAB, 8, 2) // 2  # vocabulary-parallel, NeMo's padding
    again, _, _ = restore(out, plugins)
    with torch.no_grad():
        assert torch.equal(again.logits(BATCH)["prediction_logits"][..., :VOCAB], got["prediction_logits"][..., :VOCAB])


def _tp2_logits(state, nemo):
    from mega.checkpoint import restore as open_restore

    model, _, _ = open_restore(nemo, parallel=state)
    with torch.no_grad():
        return {k: v for k, v in model.logits(BATCH).items() if k == "logits"}


@pytest.mark.slow
def test_a_tp1_nemo_archive_loads_at_tp2(encoder, data, tmp_path):
    """The reverse of the TP=2 archives above: a single-rank NeMo archive opened by two
    tensor-parallel ranks (each resharding its import) computes the same logits."""
    from mega.testing import run_ranks

    nemo = tmp_path / "ner.nemo"
    want = build_task_archive(nemo, encoder, data, "token_classification")
    for got in run_ranks(_tp2_logits, world=2, tp=2, args=(str(nemo),), timeout=300):
        torch.testing.assert_close(got["logits"], want["logits"], rtol=0, atol=1e-5)
