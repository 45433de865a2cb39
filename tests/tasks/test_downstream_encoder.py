"""`model.language_model.lm_checkpoint` from every source a fine-tuning run accepts: a
Hugging Face MegatronBert directory, an NGC-style zip, and a Megatron-LM `iter_XXXXXXX`
directory with one `mp_rank_XX` shard per tensor-parallel rank. For each, the run's
encoder at step 0 is the source's (against transformers' own model, or `mega import` of
the same source, or the model the shards were cut from), and an architecture that is
missing or differs from the checkpoint's is an error naming the key."""
from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import pytest
import torch

import mega
from mega.cli import main
from mega.config import config_from_dict
from mega.errors import CheckpointError, ConfigError
from mega.checkpoint import restore
from mega.plugins.tasks.encoder import encoder_state
from mega.runtime.collate import collate
from tests.helpers.tasks import WORDS, task_files as _files, task_raw as _raw

ENCODER = ("language_model.embedding.", "language_model.encoder.")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _files(tmp_path_factory.mktemp("encoder"))["dir"]


def _finetune(d: Path, tmp: Path, name: str, lm: dict, vocab=None, run: bool = True):
    """A one-step text-classification run from `lm` at a learning rate that leaves the
    encoder as loaded (or, with run=False, just its config)."""
    raw = _raw(d, tmp, name, {"name": "text_classification", "train_ds": str(d / "sentiment.tsv"),
                              "dataset": {"num_classes": 2, "max_seq_length": 16}, "language_model": lm}, steps=1)
    raw["model"]["optim"]["lr"] = 1e-9
    raw["trainer"]["val_check_interval"] = 0
    if vocab is None:
        del raw["model"]["tokenizer"]["vocab_file"]
    else:
        raw["model"]["tokenizer"]["vocab_file"] = str(vocab)
    cfg = config_from_dict(raw, [], None)
    return mega.run(cfg) if run else cfg


def _same_encoder(mine: dict, theirs: dict) -> float:
    keys = [k for k in theirs if k.startswith(ENCODER)]
    assert keys and all(k in mine for k in keys)
    return max(float((mine[k].float() - theirs[k].float()).abs().max()) for k in keys)


def _imported(source, tmp: Path, *options) -> dict:
    assert main(["import", str(source), str(tmp), *options]) == 0
    model, _, _ = restore(tmp)
    return model.state_dict()


# --- Hugging Face -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_dir(data, tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    config = transformers.MegatronBertConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                                             type_vocab_size=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = transformers.MegatronBertForPreTraining(config).eval()
    d = tmp_path_factory.mktemp("hf")
    model.save_pretrained(d)
    shutil.copy(data / "vocab.txt", d / "vocab.txt")
    return d, model


def test_huggingface_directory_describes_itself_and_loads(data, hf_dir, tmp_path):
    source, hf = hf_dir
    run = _finetune(data, tmp_path, "hf", {"lm_checkpoint": str(source)})  # no architecture, no vocab_file given
    c = run.model.config
    assert (c.num_layers, c.hidden_size, c.num_attention_heads, c.ffn_hidden_size, c.layernorm_epsilon) == (2, 32, 4, 64, 1e-12)
    assert Path(run.config.model.tokenizer.vocab_file) == source / "vocab.txt"
    diff = _same_encoder(run.model.state_dict(), _imported(source, tmp_path / "imported"))
    assert diff < 1e-6, diff
    # against transformers itself: the encoder's last hidden states at the real positions
    model = run.model.eval()
    batch = collate(run.model.downstream_task.samples("train", run.tokenizer)[:4])
    mine = model.logits(batch)["last_hidden_state"]
    with torch.no_grad():
        theirs = hf.bert(input_ids=batch["tokens"], attention_mask=batch["padding_mask"],
                         token_type_ids=batch["tokentype_ids"]).last_hidden_state
    real = batch["padding_mask"].bool()
    err = float((mine[real] - theirs[real]).abs().max())
    print(f"HF MegatronBert dir: max |d| of the encoder's hidden states vs transformers: {err:.3g}")
    assert err < 1e-4


def test_huggingface_directory_of_another_shape_names_the_key(data, hf_dir, tmp_path):
    source, _ = hf_dir
    lm = {"lm_checkpoint": str(source), "config": {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 2,
                                                   "ffn_hidden_size": 64, "max_position_embeddings": 64,
                                                   "layernorm_epsilon": 1e-12}}
    with pytest.raises(CheckpointError, match=r"model\.language_model\.config\.num_attention_heads=2 but the checkpoint has 4"):
        _finetune(data, tmp_path, "hf-heads", lm, vocab=source / "vocab.txt")


# --- NGC zip --------------------------------------------------------------------------------


@pytest.mark.slow
def test_ngc_zip(data, tmp_path):
    from tests.helpers.bert_files import NGC_SHAPE, google_vocab as _google_vocab, ngc_zip as _ngc_zip

    archive = _ngc_zip(tmp_path / "megatron_bert_345m_v0_1_uncased.zip", "uncased")
    vocab = _google_vocab(tmp_path / "vocab.txt", 30522)
    arch = {"num_layers": NGC_SHAPE["layers"], "hidden_size": NGC_SHAPE["hidden"], "num_attention_heads": NGC_SHAPE["heads"],
            "ffn_hidden_size": NGC_SHAPE["ffn"], "max_position_embeddings": NGC_SHAPE["positions"]}
    with pytest.raises(ConfigError, match=r"model\.language_model\.config_file"):  # nothing says the architecture
        _finetune(data, tmp_path, "ngc-none", {"lm_checkpoint": str(archive)}, vocab=vocab, run=False).model.check(
            mega.plugin_manager.get_plugins())
    run = _finetune(data, tmp_path, "ngc", {"lm_checkpoint": str(archive), "config": arch}, vocab=vocab)
    reference = _imported(archive, tmp_path / "imported", "--option", f"vocab_file={vocab}")
    diff = _same_encoder(run.model.state_dict(), reference)
    print(f"NGC zip -> fine-tuning encoder vs mega import: max |d| {diff:.3g}")
    assert diff < 1e-6, diff
    # the zip's one file on its own (NGC's BioMegatron ships a bare MegatronBERT.pt)
    with zipfile.ZipFile(archive) as z:
        (tmp_path / "MegatronBERT.pt").write_bytes(z.read("release/mp_rank_00/model_optim_rng.pt"))
    state, _ = encoder_state(tmp_path / "MegatronBERT.pt", mega.plugin_manager.get_plugins(), str(vocab))
    assert _same_encoder(state, reference) == 0.0
    wrong = {**arch, "num_layers": 1}
    with pytest.raises(CheckpointError, match=r"model\.language_model\.config\.num_layers=1 but the checkpoint has 2"):
        _finetune(data, tmp_path, "ngc-wrong", {"lm_checkpoint": str(archive), "config": wrong}, vocab=vocab)


# --- Megatron-LM iter_XXXXXXX with two tensor-parallel shards ---------------------------------


def test_megatron_iteration_directory_with_two_shards(data, tmp_path):
    from mega.checkpoint import save_model_checkpoint
    from mega.plugin_manager import get_plugins

    plugins = get_plugins()
    arch = {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "max_position_embeddings": 64}
    raw = _raw(data, tmp_path, "pre", {"name": "bert", "seq_length": 32, **arch})
    del raw["model"]["language_model"]
    cfg = config_from_dict(raw, [], plugins)
    tokenizer = plugins.tokenizers.get("wordpiece").factory(cfg.model.tokenizer, [], None)
    bert = plugins.models.get("bert").factory(cfg.model, tokenizer, plugins)
    save_model_checkpoint(tmp_path / "pre", cfg, bert, tokenizer, plugins)
    assert main(["export", str(tmp_path / "pre"), str(tmp_path / "megatron"), "--to", "megatron",
                 "--option", "tensor_parallel=2"]) == 0
    (iteration,) = sorted((tmp_path / "megatron").glob("iter_*"))
    assert sorted(p.name for p in iteration.iterdir()) == ["mp_rank_00", "mp_rank_01"]
    shard = torch.load(iteration / "mp_rank_01" / "model_optim_rng.pt", map_location="cpu", weights_only=False)
    qkv = shard["model"]["language_model"]["encoder"]["layers.0.self_attention.query_key_value.weight"]
    assert qkv.shape == (3 * 32 // 2, 32)  # a real tensor-parallel shard: half of the heads

    run = _finetune(data, tmp_path, "ft", {"lm_checkpoint": str(iteration), "config": arch}, vocab=data / "vocab.txt")
    diff = _same_encoder(run.model.state_dict(), bert.state_dict())
    print(f"Megatron iter dir (TP=2 shards) -> fine-tuning encoder: max |d| {diff:.3g}")
    assert diff < 1e-6, diff
    with pytest.raises(CheckpointError, match=r"model\.language_model\.config\.hidden_size=64 but the checkpoint has 32"):
        _finetune(data, tmp_path, "ft-wrong", {"lm_checkpoint": str(iteration), "config": {**arch, "hidden_size": 64}},
                  vocab=data / "vocab.txt")


# --- what lm_checkpoint may not be, and what it need not say (issue 20: 8, 9) ---------------


def test_ngc_zip_without_args_takes_the_runs_head_count(data, tmp_path):
    """NVIDIA's released 345M zips were saved without `args`: the head count, the one shape
    the tensors do not tell, comes from the run's architecture, as `mega import` takes it
    from `--option num_attention_heads`."""
    from tests.helpers.bert_files import NGC_SHAPE, google_vocab as _google_vocab, ngc_zip as _ngc_zip

    archive = _ngc_zip(tmp_path / "megatron_bert_345m_v0_1_uncased.zip", "uncased", with_args=False)
    vocab = _google_vocab(tmp_path / "vocab.txt", 30522)
    arch = {"num_layers": NGC_SHAPE["layers"], "hidden_size": NGC_SHAPE["hidden"], "num_attention_heads": NGC_SHAPE["heads"],
            "ffn_hidden_size": NGC_SHAPE["ffn"], "max_position_embeddings": NGC_SHAPE["positions"]}
    run = _finetune(data, tmp_path, "ngc-no-args", {"lm_checkpoint": str(archive), "config": arch}, vocab=vocab)
    reference = _imported(archive, tmp_path / "imported", "--option", f"vocab_file={vocab}",
                          "--option", f"num_attention_heads={NGC_SHAPE['heads']}")
    assert _same_encoder(run.model.state_dict(), reference) < 1e-6


def _gpt_run(tmp_path: Path) -> Path:
    from mega.checkpoint import save_model_checkpoint
    from mega.plugin_manager import get_plugins

    plugins = get_plugins()
    cfg = config_from_dict({"model": {"name": "gpt", "num_layers": 1, "hidden_size": 32, "num_attention_heads": 4,
                                      "seq_length": 16, "max_position_embeddings": 64, "tokenizer": {"library": "bytes"}}},
                           [], plugins)
    tokenizer = plugins.tokenizers.get("bytes").factory(cfg.model.tokenizer, [], None)
    gpt = plugins.models.get("gpt").factory(cfg.model, tokenizer, plugins)
    save_model_checkpoint(tmp_path / "gpt", cfg, gpt, tokenizer, plugins)
    return tmp_path / "gpt"


@pytest.mark.parametrize("described", [False, True], ids=["by-itself", "architecture-given"])
def test_a_gpt_run_as_lm_checkpoint_is_named(data, tmp_path, described):
    gpt = _gpt_run(tmp_path)
    lm = {"lm_checkpoint": str(gpt)}
    if described:
        lm["config"] = {"num_layers": 1, "hidden_size": 32, "num_attention_heads": 4, "max_position_embeddings": 64}
    with pytest.raises(CheckpointError, match=r"model\.language_model\.lm_checkpoint: .*gpt holds a 'gpt' model .*not a "
                                              r"BERT encoder"):
        _finetune(data, tmp_path, "from-gpt", lm, vocab=data / "vocab.txt" if described else None)
