"""T11: a NeMo 1.x `.nemo` of a Llama (`mcore_gpt: true`, megatron-core's names, NeMo's own
yaml spellings: `rotary_percentage`, `normalization: rmsnorm`, `activation: fast-swiglu`,
`bias: false`, `scale_positional_embedding`) at TP=2 imports with the logits of the
transformers model it was built from. The archive is written here from NeMo's layouts
(its HF converter's QKV grouping and [gate; up] fc1, each rank's halves), independently of
mega's importer."""
from __future__ import annotations

import io
import math
import tarfile
from pathlib import Path

import pytest
import torch
import yaml

from mega.checkpoint import restore
from mega.cli import main
from tests.helpers import llama as fx

transformers = pytest.importorskip("transformers")
SP_MEMBER = "0123456789abcdef0123456789abcdef_tokenizer.model"


def _nemo_state(hf_model, tp: int, vocab: int, divisible_by: int = 128):
    """NeMo's per-rank state dicts (`model.` + megatron-core's TE names) of an HF Llama."""
    cfg = hf_model.config
    sd = hf_model.state_dict()
    heads, groups, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    padded = math.ceil(vocab / (divisible_by * tp)) * divisible_by * tp
    shards = [{} for _ in range(tp)]

    def put(name, tensor, dim=None, halves=False):
        if dim is None:
            parts = [tensor] * tp
        elif halves:  # rank r: [gate_r; up_r]
            gate, up = tensor.chunk(2)
            parts = [torch.cat([g, u]) for g, u in zip(gate.chunk(tp), up.chunk(tp))]
        else:
            parts = tensor.chunk(tp, dim)
        for r in range(tp):
            shards[r]["model." + name] = parts[r].clone()

    pad = lambda t: torch.cat([t[:vocab], t.new_zeros(padded - vocab, t.shape[1])])  # noqa: E731
    put("embedding.word_embeddings.weight", pad(sd["model.embed_tokens.weight"]), 0)
    put("output_layer.weight", pad(sd["lm_head.weight"]), 0)
    put("decoder.final_layernorm.weight", sd["model.norm.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        q = sd[p + "self_attn.q_proj.weight"].view(groups, heads // groups, hd, -1)
        k = sd[p + "self_attn.k_proj.weight"].view(groups, 1, hd, -1)
        v = sd[p + "self_attn.v_proj.weight"].view(groups, 1, hd, -1)
        ours = f"decoder.layers.{i}."
        put(ours + "self_attention.linear_qkv.weight", torch.cat([q, k, v], dim=1).reshape(-1, cfg.hidden_size), 0)
        put(ours + "self_attention.linear_qkv.layer_norm_weight", sd[p + "input_layernorm.weight"])
        put(ours + "self_attention.linear_proj.weight", sd[p + "self_attn.o_proj.weight"], 1)
        put(ours + "mlp.linear_fc1.layer_norm_weight", sd[p + "post_attention_layernorm.weight"])
        put(ours + "mlp.linear_fc1.weight", torch.cat([sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]]), 0,
            halves=True)
        put(ours + "mlp.linear_fc2.weight", sd[p + "mlp.down_proj.weight"], 1)
        for r in range(tp):
            shards[r][f"model.{ours}self_attention.linear_qkv._extra_state"] = torch.zeros(0, dtype=torch.uint8)
    return shards


def _nemo_yaml(hf_model, tp: int) -> dict:
    cfg = hf_model.config
    scaling = cfg.rope_scaling or {}
    return {
        "target": "nemo.collections.nlp.models.language_modeling.megatron_gpt_model.MegatronGPTModel",
        "mcore_gpt": True, "encoder_seq_length": 64, "max_position_embeddings": 64,
        "num_layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size, "ffn_hidden_size": cfg.intermediate_size,
        "num_attention_heads": cfg.num_attention_heads, "num_query_groups": cfg.num_key_value_heads,
        "kv_channels": None, "make_vocab_size_divisible_by": 128, "layernorm_epsilon": cfg.rms_norm_eps,
        "normalization": "rmsnorm", "activation": "fast-swiglu", "bias": False, "hidden_dropout": 0.0,
        "attention_dropout": 0.0, "position_embedding_type": "rope", "rotary_percentage": 1.0,
        "rotary_base": int(cfg.rope_theta), "scale_positional_embedding": True, "scale_factor": scaling["factor"],
        "low_freq_factor": scaling["low_freq_factor"], "high_freq_factor": scaling["high_freq_factor"],
        "old_context_len": scaling["original_max_position_embeddings"],
        "share_embeddings_and_output_weights": False, "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": 1, "precision": 32,
        "tokenizer": {"library": "sentencepiece", "type": None, "model": f"nemo:{SP_MEMBER}", "vocab_file": None,
                      "merge_file": None},
    }


def _write_nemo(path: Path, cfg: dict, shards: list, sp: Path) -> Path:
    with tarfile.open(path, "w") as tar:
        def add(name, data):
            info = tarfile.TarInfo("./" + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        add("model_config.yaml", yaml.safe_dump(cfg).encode())
        add(SP_MEMBER, sp.read_bytes())
        for r, shard in enumerate(shards):
            buf = io.BytesIO()
            torch.save(shard, buf)
            add(f"mp_rank_{r:02d}/model_weights.ckpt", buf.getvalue())
    return path


@pytest.fixture(scope="module")
def llama_and_tokenizer(tmp_path_factory):
    import sentencepiece as spm

    sp = fx.sentencepiece_llama(tmp_path_factory.mktemp("nemo_sp"))
    vocab = spm.SentencePieceProcessor(model_file=str(sp)).get_piece_size()
    return fx.hf_model("llama_gqa_llama3", vocab), sp, vocab


def test_a_llama_nemo_archive_at_tp2_imports_with_the_hf_models_logits(llama_and_tokenizer, tmp_path, plugins):
    hf_model, sp, vocab = llama_and_tokenizer
    nemo = _write_nemo(tmp_path / "llama.nemo", _nemo_yaml(hf_model, 2), _nemo_state(hf_model, 2, vocab), sp)
    assert main(["import", str(nemo), str(tmp_path / "run")]) == 0
    model, tokenizer, config = restore(tmp_path / "run", plugins)
    mc = config.model
    assert (mc.name, mc.normalization, mc.activation, mc.num_query_groups, mc.share_embeddings_and_output_weights) == (
        "llama", "RMSNorm", "swiglu", 2, False)
    assert (mc.rope_scaling, mc.old_context_len, mc.rotary_base) == (True, 16, 500000.0)
    diff = fx.max_logit_diff(model, hf_model, fx.tokens(vocab))
    print(f"NeMo (TP=2) -> mega max |dlogit| vs HF = {diff:.3g}")
    assert diff < 1e-5


@pytest.mark.parametrize("key,value,message", [
    ("normalization", "layernorm1p", "normalization='layernorm1p'"),
    ("activation", "squared-relu", "activation='squared-relu'"),
    ("position_embedding_type", "alibi", "position_embedding_type='alibi'"),
    ("num_moe_experts", 8, "num_moe_experts=8"),
    ("qk_layernorm", True, "qk_layernorm=True"),
])
def test_what_is_not_built_is_refused_naming_the_yaml_key(llama_and_tokenizer, tmp_path, capsys, key, value, message):
    hf_model, sp, vocab = llama_and_tokenizer
    nemo = _write_nemo(tmp_path / "llama.nemo", {**_nemo_yaml(hf_model, 1), key: value}, _nemo_state(hf_model, 1, vocab),
                       sp)
    assert main(["import", str(nemo), str(tmp_path / "run")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("fmt", ["nemo", "huggingface"])
def test_a_gpt_with_llama_options_is_not_written_as_gpt2_shaped_files(llama_and_tokenizer, tmp_path, plugins, fmt):
    """GPT's NeMo and GPT-2 exports write GPT-2-shaped classes: a `gpt` run with rotary
    positions is refused naming the key, never written without them."""
    from mega.checkpoint import save_model_checkpoint
    from mega.config import config_from_dict
    from mega.errors import CheckpointError

    raw = {"model": {"name": "gpt", "num_layers": 1, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 16,
                     "position_embedding_type": "rope",
                     "tokenizer": {"library": "sentencepiece", "model": str(llama_and_tokenizer[1])}},
           "exp_manager": {"exp_dir": str(tmp_path), "name": "x"}}
    config = config_from_dict(raw, plugins=plugins)
    tokenizer = plugins.tokenizers.get("sentencepiece").factory(config.model.tokenizer, [], None)
    model = plugins.models.get("gpt").factory(config.model, tokenizer, plugins)
    save_model_checkpoint(tmp_path / "ckpt", config, model, tokenizer, plugins)
    with pytest.raises(CheckpointError, match="model.position_embedding_type='rope': .* has no such option"):
        plugins.checkpoint_formats.get(fmt).factory().export_run(tmp_path / "ckpt", tmp_path / "out.nemo", {}, plugins)
    assert not (tmp_path / "out.nemo").exists()
