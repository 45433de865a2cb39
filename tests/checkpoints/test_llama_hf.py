"""The Llama family and Hugging Face: `mega import` of LlamaForCausalLM, MistralForCausalLM
and Qwen2ForCausalLM directories gives their logits (fp32, 1e-5), `mega export --to
huggingface` gives directories transformers loads with the same logits, greedy generation
with mega's grouped-query KV cache equals `generate`, and the tokenizers (Llama 2's
sentencepiece, Llama 3's and Qwen2's tokenizer.json) give transformers' ids. Everything is
built in the test (tests/helpers/llama.py); nothing is downloaded."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mega.checkpoint import restore
from mega.cli import main
from mega.errors import CheckpointError, ConfigError
from tests.helpers import llama as fx

transformers = pytest.importorskip("transformers")

TOKENIZER_OF = {"llama_gqa_llama3": "sentencepiece", "llama_mha_tied": "llama3", "llama_mqa_headdim_linear_bias": "sentencepiece",
                "qwen2_tied": "qwen2", "mistral_window": "sentencepiece"}


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("tokenizers")
    return {"sentencepiece": fx.sentencepiece_llama(d / "sp"), "llama3": fx.byte_level_json(d / "llama3", "llama3"),
            "qwen2": fx.byte_level_json(d / "qwen2", "qwen2")}


def _vocab(kind: str, files) -> int:
    if kind == "sentencepiece":
        import sentencepiece as spm

        return spm.SentencePieceProcessor(model_file=str(files[kind])).get_piece_size()
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(files[kind])).get_vocab_size(with_added_tokens=True)


def _directory(tmp_path: Path, variant: str, files, extra_rows: int = 0, config: dict = None, **save):
    kind = TOKENIZER_OF[variant]
    vocab = _vocab(kind, files)
    model = fx.hf_model(variant, vocab + extra_rows, **(config or {}))
    return model, fx.save_directory(model, tmp_path / variant, kind, files[kind], **save), vocab


# --- import and export: logits equal ---------------------------------------------------------------


@pytest.mark.parametrize("variant", list(fx.VARIANTS))
def test_import_then_export_keeps_the_logits(tmp_path, tokenizer_files, plugins, variant):
    """T1-T5: every variant imports with the HF model's logits, exports to a directory the
    same transformers class loads with those logits, and comes back tensor for tensor."""
    extra = 13 if variant.startswith("qwen2") else 0  # Qwen2's embedding has rows past its tokenizer
    hf_model, src, vocab = _directory(tmp_path, variant, tokenizer_files, extra_rows=extra)
    assert main(["import", str(src), str(tmp_path / "run")]) == 0
    model, tokenizer, config = restore(tmp_path / "run", plugins)
    mc = config.model
    assert mc.name == "llama" and tokenizer.vocab_size == vocab
    assert (mc.num_query_groups, mc.share_embeddings_and_output_weights) == (
        hf_model.config.num_key_value_heads, hf_model.config.tie_word_embeddings)
    ids = fx.tokens(vocab)
    to_mega = fx.max_logit_diff(model, hf_model, ids)
    print(f"{variant}: HF -> mega max |dlogit| = {to_mega:.3g}")
    assert to_mega < 1e-5

    out = tmp_path / "exported"
    assert main(["export", str(tmp_path / "run"), str(out), "--to", "huggingface"]) == 0
    config_json = json.loads((out / "config.json").read_text())
    assert config_json["model_type"] == hf_model.config.model_type and config_json["vocab_size"] == vocab
    back = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert type(back) is type(hf_model)
    to_hf = fx.max_logit_diff(model, back, ids)
    print(f"{variant}: mega -> HF max |dlogit| = {to_hf:.3g}")
    assert to_hf < 1e-5
    for name, t in back.state_dict().items():  # the round trip is exact (the embedding cut to the tokenizer)
        if "rotary_emb" not in name:
            assert torch.equal(t, hf_model.state_dict()[name][: t.shape[0]]), name
    if hf_model.config.tie_word_embeddings:
        from safetensors.torch import load_file

        assert "lm_head.weight" not in load_file(out / "model.safetensors")
    for field in ("rope_theta", "rope_scaling", "num_key_value_heads", "rms_norm_eps", "tie_word_embeddings"):
        assert config_json.get(field) == getattr(hf_model.config, field, None), field
    if variant.startswith("mistral"):
        assert config_json["sliding_window"] == 5 and mc.window_size == [4, 0]


def test_the_sliding_window_cuts_and_is_honoured(tmp_path, tokenizer_files, plugins):
    """Mistral's window of 5 keys over 19 positions changes the logits, and mega follows it."""
    hf_model, src, vocab = _directory(tmp_path, "mistral_window", tokenizer_files)
    wide = fx.hf_model("mistral_window", vocab, sliding_window=None)
    wide.load_state_dict(hf_model.state_dict())
    ids = fx.tokens(vocab)
    with torch.no_grad():
        assert float((hf_model(ids).logits - wide(ids).logits).abs().max()) > 1e-2
    main(["import", str(src), str(tmp_path / "run")])
    model = restore(tmp_path / "run", plugins).model
    assert fx.max_logit_diff(model, hf_model, ids) < 1e-5


@pytest.mark.parametrize("save", [{"max_shard_size": "60KB"}, {"safe_serialization": False}], ids=["sharded", "bin"])
def test_sharded_and_bin_directories_import(tmp_path, tokenizer_files, plugins, save):
    hf_model, src, vocab = _directory(tmp_path, "llama_gqa_llama3", tokenizer_files, **save)
    if "max_shard_size" in save:
        assert (src / "model.safetensors.index.json").is_file()
    main(["import", str(src), str(tmp_path / "run")])
    assert fx.max_logit_diff(restore(tmp_path / "run", plugins).model, hf_model, fx.tokens(vocab)) < 1e-5


def test_export_writes_sharded_safetensors_transformers_loads(tmp_path, tokenizer_files, plugins):
    """`--option max_shard_size` cuts the weights as `save_pretrained` does: numbered
    shards and their index; `from_pretrained` and `mega import` read them with the logits."""
    hf_model, src, vocab = _directory(tmp_path, "llama_gqa_llama3", tokenizer_files)
    main(["import", str(src), str(tmp_path / "run")])
    model = restore(tmp_path / "run", plugins).model
    out = tmp_path / "sharded"
    assert main(["export", str(tmp_path / "run"), str(out), "--to", "hf", "--option", "max_shard_size=60KB"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    assert shards == sorted(p.name for p in out.glob("model-*-of-*.safetensors"))
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in hf_model.state_dict().values())  # fp32
    from safetensors.torch import load_file

    for shard in shards:  # each within 60 kB unless one tensor alone is larger
        tensors = load_file(out / shard)
        assert len(tensors) == 1 or sum(t.numel() * 4 for t in tensors.values()) <= 60_000, shard
    back = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ids = fx.tokens(vocab)
    assert fx.max_logit_diff(model, back, ids) < 1e-5
    assert main(["import", str(out), str(tmp_path / "again")]) == 0
    assert fx.max_logit_diff(restore(tmp_path / "again", plugins).model, hf_model, ids) < 1e-5


@pytest.mark.parametrize("size", ["0", "5 parsecs", "-3GB"])
def test_a_bad_shard_size_is_refused_naming_the_option(size):
    from mega.plugins.checkpoints.hf_shards import parse_size

    assert parse_size("5GB") == 5 * 10 ** 9 and parse_size("2GiB") == 2 * 2 ** 30 and parse_size("1000") == 1000
    with pytest.raises(ConfigError, match=f"--option max_shard_size={size}: expected a positive size"):
        parse_size(size)


# --- generation --------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["llama_gqa_llama3", "llama_mqa_headdim_linear_bias", "qwen2_tied",
                                     "mistral_window"])
def test_greedy_generation_equals_transformers_generate(tmp_path, tokenizer_files, plugins, variant):
    """T8: a KV cache of the key/value heads only, RoPE continued from its length: the
    same 12 tokens as `generate` (no EOS stop), and as recomputing without a cache."""
    from mega.inference import generate

    # weights drawn wider than HF's 0.02, so greedy decoding does not settle on one token
    hf_model, src, vocab = _directory(tmp_path, variant, tokenizer_files, config={"initializer_range": 0.15})
    main(["import", str(src), str(tmp_path / "run")])
    model, tokenizer, config = restore(tmp_path / "run", plugins)
    prompt = tokenizer.encode("the model reads a token and")
    cache = model.new_kv_cache(1, 8)
    assert cache.keys[0].shape == (1, config.model.num_query_groups, 8, model.language_model.encoder.layers[0]
                                   .self_attention.head_dim)
    ours = generate(model, prompt, 12, greedy=True)
    uncached = generate(model, prompt, 12, greedy=True, use_cache=False)
    with torch.no_grad():
        theirs = hf_model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                                   pad_token_id=0)[0, len(prompt):].tolist()
    print(f"{variant}: mega {ours} HF {theirs}")
    assert ours == theirs == uncached
    assert len(set(ours)) > 3  # a sequence that says something about the cache's positions


def test_generation_stops_at_any_of_a_set_of_end_ids():
    from mega.inference import generate

    class Counter(torch.nn.Module):  # predicts the previous token + 1
        vocab_size, max_positions = 10, 32

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, tokens, cache=None):
            return torch.nn.functional.one_hot((tokens + 1) % 10, 10).float()

        def new_kv_cache(self, batch, max_len):
            return None

    assert generate(Counter(), [1], 8, greedy=True, eos_id={4, 6}, use_cache=False) == [2, 3, 4]
    assert generate(Counter(), [1], 8, greedy=True, eos_id=3, use_cache=False) == [2, 3]


# --- tokenizers ----------------------------------------------------------------------------------------


def test_llama2_sentencepiece_gives_the_slow_llama_tokenizers_ids(tokenizer_files, plugins):
    """T12: `<s>` first (add_bos), then sentencepiece's ids: LlamaTokenizer (legacy, slow) on the
    awkward strings."""
    from mega.plugins.tokenizers.sentencepiece import SentencePieceConfig

    model = tokenizer_files["sentencepiece"]
    ours = plugins.tokenizers.get("sentencepiece").factory(SentencePieceConfig(model=str(model), add_bos=True), [], None)
    theirs = transformers.LlamaTokenizer(vocab_file=str(model), legacy=True, add_bos_token=True, add_eos_token=False)
    assert (ours.bos_id, ours.eos_id) == (1, 2) == (theirs.bos_token_id, theirs.eos_token_id)
    for text in fx.AWKWARD:
        assert ours.encode(text) == theirs.encode(text), text


@pytest.mark.parametrize("style", ["llama3", "qwen2"])
def test_tokenizer_json_gives_pretrained_tokenizer_fast_ids(tmp_path, tokenizer_files, plugins, style):
    """T12: a Llama-3-style tokenizer.json (BOS from its post-processor) and a Qwen2-style
    one (no BOS), read as `mega import` reads a directory, give transformers' ids."""
    from mega.config import config_from_dict

    src = fx.save_directory(fx.hf_model("llama_mha_tied", 32), tmp_path / style, style, tokenizer_files[style])
    interop = plugins.tokenizer_converters.get("huggingface").factory()
    table, files = interop.from_hf(src, {}, json.loads((src / "config.json").read_text()), False)
    assert table.get("add_bos", False) is (style == "llama3")
    cfg = config_from_dict({"model": {"name": "llama", "tokenizer": {**table, **{k: str(v) for k, v in files.items()}}}},
                           plugins=plugins).model.tokenizer
    ours = plugins.tokenizers.get("huggingface").factory(cfg, [], None)
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_file=str(src / "tokenizer.json"))
    for text in fx.AWKWARD + ["<|end_of_text|> and <|endoftext|> inside"]:
        assert ours.encode(text) == theirs.encode(text), text
    if style == "llama3":
        assert ours.encode("a b")[0] == ours.bos_id == theirs.convert_tokens_to_ids("<|begin_of_text|>")


@pytest.mark.parametrize("kind", ["sentencepiece", "llama3"])
def test_an_exported_tokenizer_gives_the_same_ids_to_auto_tokenizer(tmp_path, tokenizer_files, plugins, kind):
    variant = "llama_gqa_llama3" if kind == "sentencepiece" else "llama_mha_tied"
    _, src, _ = _directory(tmp_path, variant, tokenizer_files)
    main(["import", str(src), str(tmp_path / "run")])
    tokenizer = restore(tmp_path / "run", plugins).tokenizer
    assert tokenizer.add_bos
    for use_fast in (False, True):  # the source directory as transformers reads it, slow and fast
        source = transformers.AutoTokenizer.from_pretrained(src, use_fast=use_fast)
        for text in fx.AWKWARD:
            assert source.encode(text) == tokenizer.encode(text), (use_fast, text)
    main(["export", str(tmp_path / "run"), str(tmp_path / "out"), "--to", "hf"])
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    for text in fx.AWKWARD:
        assert theirs.encode(text) == tokenizer.encode(text), text
    main(["import", str(tmp_path / "out"), str(tmp_path / "again")])
    again = restore(tmp_path / "again", plugins).tokenizer
    assert all(again.encode(t) == tokenizer.encode(t) for t in fx.AWKWARD)


# --- refusals ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value, message", [
    ("hidden_act", "gelu", "hidden_act='gelu'"),
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, "rope_scaling.rope_type='yarn'"),
    ("rope_scaling", {"rope_type": "dynamic", "factor": 4.0}, "rope_scaling.rope_type='dynamic'"),
    ("attention_bias", True, "attention_bias=True: with mlp_bias=False"),
    ("partial_rotary_factor", 0.5, "partial_rotary_factor=0.5"),
    ("num_local_experts", 8, "num_local_experts=8"),
])
def test_import_refuses_what_is_not_built_naming_the_field(tmp_path, tokenizer_files, plugins, field, value, message):
    """T13: a config.json field mega would compute differently is refused by name."""
    _, src, _ = _directory(tmp_path, "llama_gqa_llama3", tokenizer_files)
    config = json.loads((src / "config.json").read_text())
    config[field] = value
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace("[", r"\[")):
        plugins.checkpoint_formats.get("huggingface").factory().import_run(src, tmp_path / "run", {}, plugins)
    assert not (tmp_path / "run").exists()


def test_qwen2_sliding_window_is_refused(tmp_path, tokenizer_files, plugins):
    _, src, _ = _directory(tmp_path, "qwen2_tied", tokenizer_files)
    config = json.loads((src / "config.json").read_text())
    config.update(use_sliding_window=True, sliding_window=8)
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="use_sliding_window=True"):
        plugins.checkpoint_formats.get("huggingface").factory().import_run(src, tmp_path / "run", {}, plugins)


def test_export_refuses_what_no_class_holds_naming_the_key(tmp_path, plugins):
    """A `llama` run with interleaved RoPE, learned positions or GELU has no transformers
    class among the three."""
    from mega.checkpoint import save_model_checkpoint
    from mega.config import config_from_dict

    fmt = plugins.checkpoint_formats.get("huggingface").factory()
    for keys, message in (({"rotary_interleaved": True}, "model.rotary_interleaved=True"),
                          ({"position_embedding_type": "learned_absolute"}, "model.position_embedding_type"),
                          ({"activation": "gelu"}, "model.activation='gelu'")):
        raw = {"model": {"name": "llama", "num_layers": 1, "hidden_size": 32, "num_attention_heads": 4,
                         "ffn_hidden_size": 48, "seq_length": 16, "tokenizer": {"library": "bytes"}, **keys},
               "exp_manager": {"exp_dir": str(tmp_path), "name": "x"}}
        config = config_from_dict(raw, plugins=plugins)
        tokenizer = plugins.tokenizers.get("bytes").factory(config.model.tokenizer, [], None)
        model = plugins.models.get("llama").factory(config.model, tokenizer, plugins)
        save_model_checkpoint(tmp_path / "ckpt", config, model, tokenizer, plugins)
        with pytest.raises(CheckpointError, match=message):
            fmt.export_run(tmp_path / "ckpt", tmp_path / "out", {}, plugins)
        assert not (tmp_path / "out").exists()
        import shutil

        shutil.rmtree(tmp_path / "ckpt")


def test_config_rules_name_the_keys(plugins):
    """§2.2: group counts, head dims, RoPE keys without RoPE, exclusive scalings, windows."""
    from mega.config import config_from_dict

    base = {"name": "llama", "num_layers": 2, "hidden_size": 64, "num_attention_heads": 8, "ffn_hidden_size": 96,
            "seq_length": 16, "tokenizer": {"library": "bytes"}}
    for keys, message in (
            ({"num_query_groups": 3}, "model.num_query_groups=3: must divide model.num_attention_heads=8"),
            ({"num_query_groups": 2, "tensor_model_parallel_size": 4},
             "model.num_query_groups=2 is not divisible by model.tensor_model_parallel_size=4"),
            ({"position_embedding_type": "learned_absolute", "rotary_base": 5e5},
             "model.rotary_base=500000.0 needs model.position_embedding_type"),
            ({"rope_scaling": True, "seq_len_interpolation_factor": 2.0}, "two RoPE scalings"),
            ({"window_size": [4, 1]}, r"model.window_size=\[4, 1\]"),
            ({"rotary_percent": 0.1}, "rotates 0 of 8 head dims"),
            ({"hidden_size": 60}, "set model.kv_channels"),
            ({"ffn_hidden_size": None, "hidden_size": 16, "num_attention_heads": 2}, "model.ffn_hidden_size")):
        with pytest.raises(ConfigError, match=message):
            config_from_dict({"model": {**base, **keys}}, plugins=plugins).model.check()
    mc = config_from_dict({"model": {**base, "hidden_size": 60, "kv_channels": 16}}, plugins=plugins).model
    mc.check()  # a head dim of its own (Mistral-NeMo's 5120 / 32 heads of 128)
