"""Fine-tuned tasks in NeMo 1.x `.nemo` archives, both ways: NeMo's NLP task models on a
Megatron-BERT encoder, as NeMo v1.4.0 saves and restores them (the layout of NeMo's
Megatron-BERT fine-tuning document; `NLPModel.save_to` / `restore_from`).

| mega task | NeMo class (v1.4.0) | NeMo's head section -> mega's |
|---|---|---|
| `token_classification` | `TokenClassificationModel` | `head` (TokenClassifier) -> `model.head` |
| `text_classification`, `relation_extraction` | `TextClassificationModel` | `classifier_head` (SequenceClassifier) -> `model.classifier_head` |
| `question_answering` | `QAModel` | `token_classifier` (TokenClassifier, 2 outputs) -> `model.token_classifier` |

(NeMo 1.x has no multiple-choice model; BioMegatron's relation extraction is its text
classification, and such an archive imports as `text_classification`.)

* **Weights.** The encoder under `bert_model.` (mega.plugins.models.bert_interop.nemo), the
  head as `classifier.mlp.layer{0,2,..}` (NeMo's MultiLayerPerceptron, mega's
  `ClassifierMLP` under the same names). A task trained with mega's Megatron-style head
  exports its one linear layer as a one-layer NeMo head (`token_classification_head`,
  `qa_head` -> `classifier.mlp.layer0`); text classification's pooler has no NeMo
  counterpart, so such a run is refused naming `model.classifier_head`.
* **Archive.** gzipped (NeMo 1.4 opens `r:gz` only), `model_config.yaml` with the class's
  `target`, the tokenizer (`tokenizer_name` + `vocab_file`), the encoder's config JSON
  (`language_model.config_file`), `megatron_checkpoint_version.json` (3.0: mega's QKV
  order) and, for text classification with names, `class_labels.class_labels_file`.
* **Label maps** travel in the yaml: token classification's `label_ids` ({label: id}),
  text classification's `dataset.num_classes` and its class_labels_file's names.
  `dataset.class_balancing` is not carried in: its weights come from the training files
  (set it again to fine-tune on).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import attrs

import mega
from mega.errors import CheckpointError, ConfigError
from mega.protocols import Match
from mega.plugins.checkpoints.megatron.layout import current_name
from mega.plugins.models.bert_interop import nemo as encoder

CONFIG = "model_config.yaml"
NLP = "nemo.collections.nlp.models."
TARGETS = {  # mega task -> NeMo 1.4.0 class
    "token_classification": NLP + "token_classification.token_classification_model.TokenClassificationModel",
    "text_classification": NLP + "text_classification.text_classification_model.TextClassificationModel",
    "relation_extraction": NLP + "text_classification.text_classification_model.TextClassificationModel",
    "question_answering": NLP + "question_answering.qa_model.QAModel",
}
CLASSES = {"TokenClassificationModel": "token_classification", "TextClassificationModel": "text_classification",
           "QAModel": "question_answering"}
HEAD_SECTIONS = {"token_classification": "head", "text_classification": "classifier_head",
                 "relation_extraction": "classifier_head", "question_answering": "token_classifier"}
# mega's Megatron-style heads that are a one-layer NeMo MLP
ONE_LAYER_HEADS = {"token_classification_head": "classifier.mlp.layer0", "qa_head": "classifier.mlp.layer0"}
WORD = "language_model.embedding.word_embeddings.weight"


def task_of(cfg: dict) -> Optional[str]:
    return CLASSES.get(str(cfg.get("target", "")).rsplit(".", 1)[-1])


def _plain(value) -> bool:
    return isinstance(value, (str, int, float, bool)) and value != "???"


def _split_files(cfg: dict, keys) -> Dict[str, dict]:
    """The splits' file keys NeMo's yaml gives (paths of the machine it was trained on:
    used when they exist there, else set them), values that are NeMo's '???' left out."""
    out = {}
    for split in ("train_ds", "validation_ds", "test_ds"):
        section = cfg.get(split) or {}
        found = {k: section[k] for k in keys if _plain(section.get(k))}
        if found:
            out[split] = found
    return out


def model_table(cfg: dict, artifact: Callable[[str], Optional[bytes]], source) -> dict:
    """mega's task table for a NeMo 1.4 NLP task model's yaml (and its artifacts)."""
    task = task_of(cfg)
    if task is None:
        raise CheckpointError(f"{source}: {CONFIG}: target={cfg.get('target')!r} is not a NeMo task model mega reads")
    arch = encoder.encoder_arch(cfg, artifact("language_model.config_file"), source)
    dataset = cfg.get("dataset") or {}
    table: dict = {"name": task, "language_model": {"config": arch}}
    head = cfg.get(HEAD_SECTIONS[task])
    if isinstance(head, dict):
        table[HEAD_SECTIONS[task]] = {k: v for k, v in head.items() if v is not None}
    if task == "token_classification":
        label_ids = cfg.get("label_ids")
        if not isinstance(label_ids, dict) or not label_ids:
            raise CheckpointError(f"{source}: {CONFIG}: label_ids={label_ids!r}: a fine-tuned token classification"
                                  " model carries its {label: id} map")
        table["label_ids"] = {str(k): int(v) for k, v in label_ids.items()}
        table["dataset"] = {k: dataset[k] for k in ("data_dir", "max_seq_length", "pad_label", "ignore_extra_tokens",
                                                      "ignore_start_end") if _plain(dataset.get(k))}
        table.update(_split_files(cfg, ("text_file", "labels_file", "num_samples")))
    elif task == "text_classification":
        if not isinstance(dataset.get("num_classes"), int):
            raise CheckpointError(f"{source}: {CONFIG}: dataset.num_classes={dataset.get('num_classes')!r}: needed")
        table["dataset"] = {k: dataset[k] for k in ("num_classes", "max_seq_length") if _plain(dataset.get(k))}
        names = artifact("class_labels.class_labels_file")
        if names is not None:
            table["class_labels"] = {"names": [n.strip() for n in names.decode("utf-8").splitlines() if n.strip()]}
        table.update(_split_files(cfg, ("file_path", "num_samples")))
    else:
        table["dataset"] = {k: dataset[k] for k in ("version_2_with_negative", "doc_stride", "max_query_length",
                                                      "max_seq_length", "max_answer_length", "null_score_diff_threshold",
                                                      "n_best_size", "do_lower_case") if _plain(dataset.get(k))}
        table.update(_split_files(cfg, ("file", "num_samples")))
    table.setdefault(HEAD_SECTIONS[task], {})  # NeMo's class always builds its head (the section's defaults)
    return table


def mega_name(name: str) -> Optional[str]:
    """A NeMo NLP model's key under mega's name: the encoder's without `bert_model.` (older
    Megatron spellings brought up to date), the head's as it is (mega's ClassifierMLP has
    NeMo's names); anything else unchanged, for the format to name as a tensor mega has no
    place for."""
    if name.startswith(encoder.ENCODER):
        ours = encoder.encoder_mega_name(encoder.ENCODER + current_name(name[len(encoder.ENCODER):]))
        return ours if ours is not None else name
    return name


# --- export -------------------------------------------------------------------------------------


def _arch(mc) -> Dict[str, object]:
    """The encoder keys of a task config (model.language_model, filled with the encoder's defaults)."""
    from mega.plugins.models.bert import BertEncoderConfig
    from mega.plugins.tasks.encoder import architecture

    defaults = {a.name: a.default for a in attrs.fields(BertEncoderConfig)
                if a.default is not attrs.NOTHING and not isinstance(a.default, attrs.Factory)}
    return {**defaults, **architecture(mc.language_model, BertEncoderConfig)}


def _head(mc) -> Tuple[str, dict]:
    """(NeMo's head section name, its content) for the task config `mc`."""
    section = HEAD_SECTIONS[mc.name]
    head = getattr(mc, section, None)
    if mc.name in ("text_classification", "relation_extraction"):
        if head is None:
            raise ConfigError(f"model.classifier_head: unset, so the head is mega's Megatron-style one (the pooler's dense"
                              " + tanh, then a linear layer), which NeMo's SequenceClassifier cannot hold; fine-tune with"
                              " model.classifier_head = {num_output_layers = N} (NeMo's head) to export it")
        return section, {"num_output_layers": head.num_output_layers, "fc_dropout": head.fc_dropout}
    if mc.name == "token_classification":
        if head is None:  # mega's one linear layer: NeMo's head of one layer
            return section, {"num_fc_layers": 1, "fc_dropout": float(_arch(mc).get("hidden_dropout", 0.1)),
                             "activation": "relu", "use_transformer_init": True}
        return section, {"num_fc_layers": head.num_fc_layers, "fc_dropout": head.fc_dropout,
                         "activation": head.activation, "use_transformer_init": True}
    if head is None:
        return section, {"num_layers": 1, "dropout": 0.0, "num_classes": 2, "activation": "relu", "log_softmax": False,
                         "use_transformer_init": True}
    return section, {"num_layers": head.num_layers, "dropout": head.dropout, "num_classes": 2,
                     "activation": head.activation, "log_softmax": head.log_softmax, "use_transformer_init": True}


def _splits(mc, keys, defaults=None) -> Dict[str, dict]:
    """NeMo's split sections: mega's file keys (`defaults(split)`: the names mega reads when unset)."""
    out = {}
    for split in ("train_ds", "validation_ds", "test_ds"):
        files = getattr(mc, split)
        fallback = defaults(split) if defaults else {}
        section = {k: getattr(files, k) or fallback.get(k) for k in keys}
        out[split] = {**section, "shuffle": split == "train_ds", "num_samples": files.num_samples,
                      "batch_size": mc.micro_batch_size}
    return out


def nemo_config(mc, tokenizer_section: dict, tp: int) -> dict:
    """model_config.yaml of the NeMo 1.4 task model for mega's task config `mc`."""
    arch = _arch(mc)
    encoder.check_encoder_export(arch)
    if not tokenizer_section.get("vocab_file"):
        raise ConfigError("model.tokenizer.library: NeMo 1.4's Megatron-BERT encoder reads a BERT vocab.txt; export a"
                          " task fine-tuned with the wordpiece tokenizer")
    if int(arch["num_attention_heads"]) % tp:
        raise ConfigError(f"model.language_model.config.num_attention_heads={arch['num_attention_heads']} is not"
                          f" divisible by --option tensor_parallel={tp}")
    from mega.plugins.models.gpt_interop.nemo import optim_section

    section, head = _head(mc)
    d = mc.dataset
    cfg: dict = {}
    if mc.name == "token_classification":
        cfg["label_ids"] = {label: i for i, label in enumerate(d.label_ids)}
        cfg["class_labels"] = {"class_labels_file": mc.class_labels.class_labels_file}
        cfg["dataset"] = {"data_dir": d.data_dir, "class_balancing": d.class_balancing, "max_seq_length": d.max_seq_length,
                          "pad_label": d.pad_label, "ignore_extra_tokens": d.ignore_extra_tokens,
                          "ignore_start_end": d.ignore_start_end, "use_cache": False, "num_workers": 2,
                          "pin_memory": False, "drop_last": False}
        from mega.plugins.tasks.token_classification import DEFAULT_FILES

        def default(split):
            text, labels = DEFAULT_FILES["train" if split == "train_ds" else "valid"]
            return {"text_file": text, "labels_file": labels}
        cfg.update(_splits(mc, ("text_file", "labels_file"), default))
    elif mc.name in ("text_classification", "relation_extraction"):
        cfg["class_labels"] = {"class_labels_file": None}
        cfg["dataset"] = {"num_classes": d.num_classes, "do_lower_case": False, "max_seq_length": d.max_seq_length,
                          "class_balancing": d.class_balancing, "use_cache": False}
        cfg.update(_splits(mc, ("file_path",)))
        cfg["infer_samples"] = []
    else:
        cfg["dataset"] = {k: getattr(d, k) for k in ("version_2_with_negative", "doc_stride", "max_query_length",
                                                     "max_seq_length", "max_answer_length", "null_score_diff_threshold",
                                                     "n_best_size", "do_lower_case")}
        cfg["dataset"].update({"use_cache": False, "num_workers": 2, "pin_memory": False, "drop_last": False})
        cfg.update(_splits(mc, ("file",)))
    pretrained = encoder.encoder_name_for(tokenizer_section.get("tokenizer_name") != "megatron-bert-cased")
    cfg.update({
        "tokenizer": tokenizer_section,
        "language_model": {"pretrained_model_name": pretrained, "lm_checkpoint": None, "config_file": None,
                           "config": None},
        section: head,
        "optim": optim_section(mc) | {"name": "adam"},
        "target": TARGETS[mc.name], "nemo_version": encoder.ENCODER_RELEASE,
    })
    return cfg


def nemo_artifacts(mc, lower_case: bool) -> Dict[str, Tuple[str, bytes]]:
    pretrained = encoder.encoder_name_for(lower_case)
    out = {"language_model.config_file": (encoder.config_file_name(pretrained),
                                          encoder.encoder_config_json(_arch(mc), lower_case)),
           # NeMo registers it under this dotted key: the yaml gets megatron_checkpoint_version: {json: nemo:...}
           "megatron_checkpoint_version.json": ("megatron_checkpoint_version.json", encoder.checkpoint_version_json())}
    names = getattr(getattr(mc, "class_labels", None), "names", None)
    if mc.name in ("text_classification", "relation_extraction") and names:
        out["class_labels.class_labels_file"] = ("label_ids.csv", "".join(f"{n}\n" for n in names).encode())
    return out


def nemo_names(name: str):
    """mega's tensor -> the NeMo NLP model's keys."""
    if name.startswith("language_model."):
        return (encoder.encoder_nemo_name(name),)
    module = name.split(".", 1)[0]
    if module in ONE_LAYER_HEADS:
        return (ONE_LAYER_HEADS[module] + name[len(module):],)
    return (name,)  # classifier.mlp.layer*: NeMo's names already


class NemoTaskInterop:
    """NeMo 1.4's NLP task models (NemoModelConverter, NemoArchiveReader, NemoModelExporter)."""

    vocab_tensors = (WORD,)
    nemo_tokenizer_style = "nlp"
    nemo_gzip = True

    def nemo_recognises(self, nemo_config: dict) -> Match:
        return Match.MARKED if task_of(nemo_config) else Match.NO

    def nemo_model_table(self, nemo_config: dict, where: str) -> dict:
        return model_table(nemo_config, lambda key: None, where)

    def nemo_model_table_from(self, nemo_config: dict, artifact, where: str) -> dict:
        return model_table(nemo_config, artifact, where)

    def nemo_mega_name(self, name: str):
        return mega_name(name)

    def nemo_config(self, model_config, tokenizer_section: dict, tp: int) -> dict:
        return nemo_config(model_config, tokenizer_section, tp)

    def nemo_names(self, name: str, model_config):
        return nemo_names(name)

    def nemo_vocab_rows(self, model_config, tokenizer, tp: int) -> int:
        return encoder.encoder_vocab_rows(tokenizer.vocab_size, tp)

    def nemo_artifacts(self, model_config, tp: int):
        from mega.plugins.tokenizers.wordpiece_interop import lower_case_of

        return nemo_artifacts(model_config, lower_case_of(model_config.tokenizer))


@mega.hookimpl
def register_model_converters(register):
    """The first-party tasks NeMo 1.x has a model for, under their model names (a task's name
    is a model too). A plugin of its own: a task's module registers the task and nothing else."""
    for task in TARGETS:
        register(task, NemoTaskInterop)
