"""NeMo 1.23's MegatronT5Model / MegatronBARTModel archives (MIM / VAE: with the hiddens
module), both ways.

Archives are built here as NeMo's save code builds them (tests/nemo_archives.py) from a
randomly initialised mega encoder-decoder, its tensors under NeMo's module tree (the shared
embedding under `encoder_embedding` and `decoder_embedding`, the stacks under
`enc_dec_model.{encoder,decoder}.model`, the output bias `tokens_head.bias`, the
cond_gaussian projection split by rows as NeMo's ColumnParallelLinear is), the vocabulary
padded to what NeMo's T5 tokenizer counts; imported, the model computes the source's
logits, and mega -> .nemo -> mega gives them again."""
from __future__ import annotations

import io
import tarfile

import pytest
import torch
import yaml

from mega.cli import main
from mega.checkpoint import restore
from mega.config import config_from_dict
from mega.testing import write_corpus
from tests.nemo_archives import pad_rows, padded, split, write_nemo

LM = "nemo.collections.nlp.models.language_modeling."
TARGET = {"t5": LM + "megatron_t5_model.MegatronT5Model", "bart": LM + "megatron_bart_model.MegatronBARTModel"}
VOCAB = 60
HIDDENS = {"enc_output_name": "z", "tokens_loss_weight": 1.0,
           "transform": {"q_z_given_x": {"cls_name": "cond_gaussian", "hidden_size": 32}},
           "loss": {"mim": {"cls_name": "a_mim", "loss_weight": 1.0}}}


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    import sentencepiece as spm

    tmp = tmp_path_factory.mktemp("spm")
    spm.SentencePieceTrainer.train(input=str(write_corpus(tmp / "corpus.txt")), model_prefix=str(tmp / "tokenizer"),
                                   vocab_size=VOCAB, model_type="bpe", pad_id=0, unk_id=1, bos_id=2, eos_id=3)
    return tmp / "tokenizer.model"


def _mega_table(name, hiddens, spm_model):
    stack = {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "ffn_hidden_size": 64,
             "hidden_dropout": 0.0, "attention_dropout": 0.0}
    table = {"name": name, "seq_length": 16, "seq_length_dec": 12, "encoder": stack,
             "decoder": {**stack, "activation": "gelu_tanh"}, "make_vocab_size_divisible_by": 8,
             "tokens_head_bias": True, "tokenizer": {"library": "sentencepiece", "model": str(spm_model)}}
    if hiddens:
        table["hiddens"] = HIDDENS
    return table


def source_model(plugins, name, hiddens, spm_model):
    mc = config_from_dict({"model": _mega_table(name, hiddens, spm_model)}, plugins=plugins).model
    tok = plugins.tokenizers.get("sentencepiece").factory(mc.tokenizer, [], None)
    torch.manual_seed(5)
    model = plugins.models.get(name).factory(mc, tok, plugins).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "layernorm" in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


ENC = torch.randint(4, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
DEC = torch.randint(4, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
MASK = torch.ones(2, 16, dtype=torch.long)
MASK[1, 13:] = 0


def logits(model):
    with torch.no_grad():
        enc = model.eval().encode(ENC, MASK)
        return model.decode(DEC, enc["enc_output"].transpose(0, 1), enc["hiddens_mask"])[..., :VOCAB + 100]


def _nemo_key(name: str) -> list:
    """mega's tensor -> NeMo 1.23's key(s), from NeMo's module tree."""
    p = "enc_dec_model."
    if name.startswith("embedding."):
        return [p + "encoder_" + name, p + "decoder_" + name]  # one module under both attributes
    if name.startswith("encoder."):
        return [p + "enc_dec_model.encoder.model." + name[len("encoder."):]]
    if name.startswith("decoder_final_layernorm."):
        return [p + "enc_dec_model.decoder.model.final_layernorm." + name.split(".", 1)[1]]
    if name.startswith("decoder."):
        return [p + "enc_dec_model.decoder.model.layers." + name[len("decoder."):]]
    if name.startswith("hiddens_module."):
        return [p + "enc_dec_model." + name]
    assert name == "tokens_head_bias", name
    return [p + "tokens_head.bias"]


def _nemo_yaml(name, tp, hiddens):
    stack = {"num_layers": 2, "hidden_size": 32, "ffn_hidden_size": 64, "num_attention_heads": 4,
             "init_method_std": 0.02, "hidden_dropout": 0.0, "attention_dropout": 0.0,
             "position_embedding_type": "learned_absolute", "kv_channels": None, "layernorm_epsilon": 1e-5,
             "bias_activation_fusion": False, "bias": True, "normalization": "layernorm", "arch": "transformer",
             "activation": "gelu", "transformer_block_type": "pre_ln", "openai_gelu": False, "megatron_legacy": False}
    cfg = {"micro_batch_size": 4, "global_batch_size": 8, "tensor_model_parallel_size": tp,
           "pipeline_model_parallel_size": 1, "make_vocab_size_divisible_by": 8, "seq_length": 16,
           "max_position_embeddings": 16, "encoder": stack, "decoder": {**stack, "bias_activation_fusion": True},
           "tokenizer": {"library": "sentencepiece", "model": None, "vocab_file": None, "merge_file": None,
                         "num_sentinel_tokens": 100, "sentencepiece_legacy": True},
           "share_token_embeddings": True, "share_decoder_tokens_head_embeddings": True, "tokens_head_bias": True,
           "data": {"seq_length_dec": 12}, "precision": 32, "target": TARGET[name]}
    if hiddens:
        cfg["hiddens"] = HIDDENS
    return cfg


# NeMo's sentencepiece T5 tokenizer for this model (pad 0, bos 2, eos 3): <cls> <sep> <mask> <pad>, then 100 sentinels
NEMO_VOCAB = VOCAB + 4 + 100


def build(path, model, name, tp, gz, hiddens, spm_model):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rows = padded(NEMO_VOCAB, 8, tp)
    for k in ("embedding.word_embeddings.weight", "tokens_head_bias"):
        state[k] = pad_rows(state[k], rows)
    nemo = {key: t for name_, t in state.items() for key in _nemo_key(name_)}
    shards = split(nemo, tp, extra_column=("hiddens_to_mean_logvar.weight", "hiddens_to_mean_logvar.bias"))
    return write_nemo(path, _nemo_yaml(name, tp, hiddens), shards,
                      {"tokenizer.model": ("tokenizer.model", spm_model.read_bytes())}, gz=gz)


@pytest.mark.parametrize("name,hiddens,tp,gz", [("t5", False, 1, False), ("bart", True, 2, True),
                                                 ("bart", True, 1, False), ("t5", True, 2, False)])
def test_a_nemo_encoder_decoder_archive_imports_with_equal_logits(plugins, spm_model, tmp_path, name, hiddens, tp, gz):
    model = source_model(plugins, name, hiddens, spm_model)
    nemo = build(tmp_path / "ed.nemo", model, name, tp, gz, hiddens, spm_model)
    assert main(["import", str(nemo), str(tmp_path / "run")]) == 0
    loaded, tokenizer, config = restore(tmp_path / "run", plugins)
    mc = config.model
    assert mc.name == name and mc.tokens_head_bias and (mc.encoder.activation, mc.decoder.activation) == ("gelu", "gelu_tanh")
    assert tokenizer.vocab_size == VOCAB and mc.extra_ids == 106  # every row of NeMo's added tokens kept
    assert (mc.hiddens is not None) == hiddens and mc.seq_length_dec == 12
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_mega_to_nemo_to_mega_keeps_the_logits(plugins, spm_model, tmp_path):
    model = source_model(plugins, "bart", True, spm_model)
    nemo = build(tmp_path / "src.nemo", model, "bart", 1, False, True, spm_model)
    assert main(["import", str(nemo), str(tmp_path / "run")]) == 0
    ref, _, _ = restore(tmp_path / "run", plugins)
    for tp in (1, 2):
        out = tmp_path / f"out{tp}.nemo"
        assert main(["export", str(tmp_path / "run"), str(out), "--to", "nemo", "--option", f"tensor_parallel={tp}"]) == 0
        assert out.read_bytes()[:2] != b"\x1f\x8b"  # NeMo 1.23 writes plain tar
        with tarfile.open(out) as tar:
            cfg = yaml.safe_load(tar.extractfile("./model_config.yaml").read())
            shard = torch.load(io.BytesIO(tar.extractfile(f"./{'mp_rank_00/' if tp > 1 else ''}model_weights.ckpt").read()),
                               weights_only=True)
        assert cfg["target"] == TARGET["bart"] and cfg["hiddens"]["enc_output_name"] == "z"
        assert "nemo_compat" not in cfg["hiddens"] and cfg["tokenizer"]["num_sentinel_tokens"] == 106
        word = shard["enc_dec_model.encoder_embedding.word_embeddings.weight"]
        assert torch.equal(word, shard["enc_dec_model.decoder_embedding.word_embeddings.weight"])
        assert shard["enc_dec_model.tokens_head.bias"].shape[0] == word.shape[0]
        proj = "enc_dec_model.enc_dec_model.hiddens_module.hidden_transforms.0.hiddens_to_mean_logvar.weight"
        assert shard[proj].shape[0] == 64 // tp  # NeMo's ColumnParallelLinear: rows split
        again, _, _ = restore(out, plugins)
        assert torch.equal(logits(again), logits(ref))


@pytest.mark.parametrize("key,value,why", [
    ("encoder.arch", "perceiver", "another block than mega's"),
    ("encoder.position_embedding_type", "relative", "learned_absolute"),
    ("decoder.normalization", "rmsnorm", "layernorm"),
    ("share_token_embeddings", False, "needs True"),
    ("decoder.activation", "swiglu", "GELU"),
])
def test_what_mega_cannot_run_is_refused_naming_the_yaml_key(plugins, spm_model, tmp_path, capsys, key, value, why):
    model = source_model(plugins, "t5", False, spm_model)
    nemo = build(tmp_path / "ed.nemo", model, "t5", 1, False, False, spm_model)
    with tarfile.open(nemo) as tar:
        cfg = yaml.safe_load(tar.extractfile("./model_config.yaml").read())
    section, _, leaf = key.rpartition(".")
    (cfg[section] if section else cfg)[leaf] = value
    from tests.nemo_archives import rewrite

    bad = rewrite(nemo, tmp_path / "bad.nemo",
                  lambda m, d: [(m, yaml.safe_dump(cfg).encode() if m.name == "./model_config.yaml" else d)])
    assert main(["import", str(bad), str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"model_config.yaml: {key}={value!r}" in err and why in err and not (tmp_path / "run").exists()


def test_export_refuses_what_nemo_has_not(plugins, spm_model, tmp_path, capsys):
    from mega.checkpoint import write_imported_run

    for table, key in ((dict(encoder={"arch": "perceiver", "hidden_steps": 4}), "model.encoder.arch"),
                       (dict(hiddens={"transform": {"g": {"cls_name": "guided_cls", "hidden_size": 32, "attr_name": "y"}}}),
                        "model.hiddens.transform.g.cls_name")):
        raw = _mega_table("t5", False, spm_model)
        raw["encoder"] = {**raw["encoder"], **table.get("encoder", {})}
        raw.update({k: v for k, v in table.items() if k != "encoder"})
        mc = config_from_dict({"model": raw}, plugins=plugins).model
        tok = plugins.tokenizers.get("sentencepiece").factory(mc.tokenizer, [], None)
        model = plugins.models.get("t5").factory(mc, tok, plugins)
        run = tmp_path / key.replace(".", "_")
        write_imported_run(run, {"model": {**raw, "tokenizer": {"library": "sentencepiece"}}}, model.state_dict(), plugins,
                           files={"model": spm_model})
        assert main(["export", str(run), str(tmp_path / "x.nemo"), "--to", "nemo"]) == 2
        assert key in capsys.readouterr().err and not (tmp_path / "x.nemo").exists()
