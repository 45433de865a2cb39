"""Hugging Face interop: the `huggingface` tokenizer gives GPT2TokenizerFast's ids, and
`mega import` / `mega export --to huggingface` carry a GPT-2 across with the same logits,
both ways. Everything is built locally (transformers' own classes from configs, a BPE
trained in the test); nothing is downloaded."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w
import torch

from mega.cli import main
from mega.errors import CheckpointError, ConfigError
from mega.checkpoint import restore
from mega.testing import WORDS, write_corpus

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EOT = "<|endoftext|>"
AWKWARD = [
    "the model reads a token",
    "  leading spaces, trailing spaces  ",
    "tabs\tand\nnew\n\nlines\r\n",
    "Ünïcödé ümlauts, 日本語のテキスト, emoji 🤖🚀 and ZWJ 👩\u200d💻",
    f"two documents{EOT}joined{EOT}",
    f" {EOT} spaced {EOT}",
    "it's they'll we've I'M don't 123 4567 3.14 $$$ ___ ...",
    "<|endoftext",
    "",
    " ",
    "\u00a0non-breaking\u2009thin\u3000ideographic",
    "a" * 300,
]


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A tiny byte-level BPE (GPT-2's kind) with <|endoftext|>, as tokenizer.json and as
    vocab.json + merges.txt."""
    from tokenizers import ByteLevelBPETokenizer

    d = tmp_path_factory.mktemp("bpe")
    text = (write_corpus(d / "corpus.txt", lines=100).read_text() + "\n".join(AWKWARD)).splitlines()
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(text, vocab_size=320, min_frequency=2, special_tokens=[EOT], show_progress=False)
    tok.save(str(d / "tokenizer.json"))
    tok.save_model(str(d))  # vocab.json, merges.txt
    return d


def _vocab(bpe_dir: Path) -> int:
    return len(json.loads((bpe_dir / "vocab.json").read_text()))


def _randomised(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Noise on every parameter: biases and LayerNorms start at 0 / 1, which would hide a
    mapping mistake in them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def _hf_model(vocab: int, activation: str = "gelu_new", **extra) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=vocab, n_positions=32, n_embd=32, n_layer=2, n_head=4, n_inner=48,
                     activation_function=activation, layer_norm_epsilon=1e-5, bos_token_id=vocab - 1,
                     eos_token_id=0, **extra)
    return _randomised(GPT2LMHeadModel(cfg))


def _hf_dir(tmp_path: Path, bpe_dir: Path, name: str = "hf", tokenizer: str = "json", **save) -> tuple:
    model = _hf_model(_vocab(bpe_dir))
    out = tmp_path / name
    model.save_pretrained(out, **save)
    if tokenizer == "json":
        (out / "tokenizer.json").write_bytes((bpe_dir / "tokenizer.json").read_bytes())
    elif tokenizer == "bpe":
        for f in ("vocab.json", "merges.txt"):
            (out / f).write_bytes((bpe_dir / f).read_bytes())
    return model, out


def _tokens(vocab: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (3, 32), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _max_diff(mega_model, hf_model, tokens) -> float:
    vocab = mega_model.vocab_size
    ours = mega_model(tokens)[..., :vocab]
    theirs = hf_model(tokens).logits
    assert ours.shape == theirs.shape
    return float((ours - theirs).abs().max())


# --- (c) the tokenizer ----------------------------------------------------------------------


@pytest.mark.parametrize("files", ["tokenizer_file", "vocab_merges"])
def test_the_tokenizer_gives_gpt2_tokenizer_fast_ids(bpe, plugins, files):
    from mega.plugins.tokenizers.huggingface import HuggingFaceConfig

    if files == "tokenizer_file":
        cfg = HuggingFaceConfig(tokenizer_file=str(bpe / "tokenizer.json"))
        theirs = GPT2TokenizerFast(tokenizer_file=str(bpe / "tokenizer.json"))
    else:
        cfg = HuggingFaceConfig(vocab_file=str(bpe / "vocab.json"), merges_file=str(bpe / "merges.txt"))
        theirs = GPT2TokenizerFast(vocab_file=str(bpe / "vocab.json"), merges_file=str(bpe / "merges.txt"))
    ours = plugins.tokenizers.get("huggingface").factory(cfg, [], None)
    assert ours.vocab_size == len(theirs) == _vocab(bpe)
    assert ours.eos_id == ours.pad_id == theirs.eos_token_id == theirs.convert_tokens_to_ids(EOT)
    for text in AWKWARD:
        ids = ours.encode(text)
        assert ids == theirs.encode(text), text
        assert ours.decode(ids) == theirs.decode(ids) == text
    assert ours.encode(EOT) == [ours.eos_id]  # a special token, never split
    assert ours.decode([ours.eos_id, 10_000]) == EOT  # ids past the vocabulary are dropped
    assert set(ours.artifacts()) == ({"tokenizer_file"} if files == "tokenizer_file" else {"vocab_file", "merges_file"})


def test_tokenizer_config_errors_name_the_key(bpe, plugins, tmp_path):
    from mega.plugins.tokenizers.huggingface import HuggingFaceConfig

    build = plugins.tokenizers.get("huggingface").factory
    with pytest.raises(ConfigError, match="needs tokenizer_file"):
        build(HuggingFaceConfig(vocab_file=str(bpe / "vocab.json")), [], None)
    with pytest.raises(ConfigError, match="model.tokenizer.tokenizer_file: no such file"):
        build(HuggingFaceConfig(tokenizer_file=str(tmp_path / "nope.json")), [], None)
    with pytest.raises(ConfigError, match=r"model.tokenizer.pad_token='<pad>': not in the tokenizer's vocabulary"):
        build(HuggingFaceConfig(tokenizer_file=str(bpe / "tokenizer.json"), pad_token="<pad>"), [], None)
    tok = build(HuggingFaceConfig(tokenizer_file=str(bpe / "tokenizer.json"), pad_token="a"), [], None)
    assert tok.pad_id == tok.tokenizer.token_to_id("a") != tok.eos_id


def test_qkv_blocks_and_heads_are_inverse_and_the_vocabulary_is_refitted():
    from mega.plugins.models.gpt_interop.huggingface import hf_to_mega, qkv_blocks_to_heads, qkv_heads_to_blocks

    heads, dim = 4, 3
    t = torch.arange(3 * heads * dim * 2, dtype=torch.float32).reshape(3 * heads * dim, 2)
    per_head = qkv_blocks_to_heads(t, heads)
    assert torch.equal(per_head.view(heads, 3, dim, 2)[1, 2], t.view(3, heads, dim, 2)[2, 1])  # head 1's v
    assert torch.equal(qkv_heads_to_blocks(per_head, heads), t)
    wte = torch.randn(10, 4)
    for padded in (8, 16):
        out = hf_to_mega({"wte.weight": wte}, 0, heads, padded, 8, "here")
        assert out["language_model.embedding.word_embeddings.weight"].shape == (padded, 4)
        assert torch.equal(out["language_model.embedding.word_embeddings.weight"][:8], wte[:8])
        assert not out["language_model.embedding.word_embeddings.weight"][10:].any()


# --- (a) HF -> mega -> HF -------------------------------------------------------------------


def test_hf_to_mega_to_hf_keeps_the_logits(tmp_path, bpe, plugins, capsys):
    hf_model, src = _hf_dir(tmp_path, bpe)
    assert (src / "model.safetensors").is_file()
    run_dir = tmp_path / "imported"
    assert main(["import", str(src), str(run_dir)]) == 0
    assert "(huggingface)" in capsys.readouterr().out
    model, tokenizer, config = restore(run_dir, plugins)
    mc = config.model
    assert (mc.num_layers, mc.hidden_size, mc.num_attention_heads, mc.ffn_hidden_size) == (2, 32, 4, 48)
    assert (mc.activation, mc.seq_length, mc.max_position_embeddings) == ("gelu_tanh", 32, 32)
    assert tokenizer.vocab_size == _vocab(bpe) and model.padded_vocab_size == 384
    assert tokenizer.eos_id == 0  # config.json's eos_token_id names <|endoftext|>
    tokens = _tokens(tokenizer.vocab_size)
    to_mega = _max_diff(model, hf_model, tokens)
    print(f"HF -> mega max |dlogit| = {to_mega:.3g}")
    assert to_mega < 1e-5

    out = tmp_path / "exported"
    assert main(["export", str(run_dir), str(out), "--to", "huggingface"]) == 0
    back = GPT2LMHeadModel.from_pretrained(out).eval()
    assert back.config.vocab_size == tokenizer.vocab_size and back.config.activation_function == "gelu_new"
    assert back.lm_head.weight.data_ptr() == back.transformer.wte.weight.data_ptr()  # tied
    to_hf = _max_diff(model, back, tokens)
    print(f"mega -> HF max |dlogit| = {to_hf:.3g}")
    assert to_hf < 1e-5
    for name, t in hf_model.state_dict().items():  # the round trip is exact
        if not name.endswith((".attn.bias", ".attn.masked_bias")):
            assert torch.equal(back.state_dict()[name], t), name
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    assert theirs.encode(AWKWARD[3]) == tokenizer.encode(AWKWARD[3]) and theirs.eos_token == EOT


@pytest.mark.parametrize("kind", ["bin", "sharded", "vocab_merges"])
def test_import_reads_bin_sharded_and_bpe_directories(tmp_path, bpe, plugins, kind):
    save = {"bin": {"safe_serialization": False}, "sharded": {"max_shard_size": "40KB"}}.get(kind, {})
    hf_model, src = _hf_dir(tmp_path, bpe, tokenizer="bpe" if kind == "vocab_merges" else "json", **save)
    if kind == "bin":  # as older files hold them: the causal-mask buffers, and an explicit (tied) lm_head
        state = torch.load(src / "pytorch_model.bin", weights_only=True)
        state["transformer.h.0.attn.bias"] = torch.ones(1, 1, 32, 32).tril()
        state["transformer.h.1.attn.masked_bias"] = torch.tensor(-1e4)
        state["lm_head.weight"] = state["transformer.wte.weight"]
        torch.save(state, src / "pytorch_model.bin")
    if kind == "sharded":
        assert (src / "model.safetensors.index.json").is_file()
    fmt = plugins.checkpoint_formats.get("huggingface").factory()
    assert fmt.can_import(src)
    fmt.import_run(src, tmp_path / "run", {"make_vocab_size_divisible_by": "8"}, plugins)
    model, tokenizer, config = restore(tmp_path / "run", plugins)
    assert model.padded_vocab_size == 320 + (-320 % 8)
    assert _max_diff(model, hf_model, _tokens(tokenizer.vocab_size)) < 1e-5
    if kind == "vocab_merges":
        assert set(tokenizer.artifacts()) == {"vocab_file", "merges_file"}


def test_exact_gelu_maps_to_gelu(tmp_path, bpe, plugins):
    hf_model = _hf_model(_vocab(bpe), activation="gelu")
    hf_model.save_pretrained(tmp_path / "hf")
    fmt = plugins.checkpoint_formats.get("huggingface").factory()
    fmt.import_run(tmp_path / "hf", tmp_path / "run", {"tokenizer_file": str(bpe / "tokenizer.json")}, plugins)
    model, tokenizer, config = restore(tmp_path / "run", plugins)
    assert config.model.activation == "gelu"
    assert _max_diff(model, hf_model, _tokens(tokenizer.vocab_size)) < 1e-5
    fmt.export_run(tmp_path / "run", tmp_path / "out", {"dtype": "bfloat16"}, plugins)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["activation_function"] == "gelu"
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(tmp_path / "out" / "model.safetensors").values()} == {torch.bfloat16}
    with pytest.raises(CheckpointError, match="out: already exists; export into a new directory"):
        fmt.export_run(tmp_path / "run", tmp_path / "out", {}, plugins)


def test_import_refusals_say_what_to_do(tmp_path, bpe, plugins):
    fmt = plugins.checkpoint_formats.get("huggingface").factory()
    _, src = _hf_dir(tmp_path, bpe, tokenizer="none")
    with pytest.raises(CheckpointError, match="--option tokenizer_file=PATH"):
        fmt.import_run(src, tmp_path / "a", {}, plugins)
    with pytest.raises(ConfigError, match="--option vocab: not an option"):
        fmt.import_run(src, tmp_path / "a", {"vocab": "x"}, plugins)
    _hf_model(_vocab(bpe), activation="relu").save_pretrained(tmp_path / "relu")
    with pytest.raises(CheckpointError, match="activation_function 'relu' has no mega equivalent"):
        fmt.import_run(tmp_path / "relu", tmp_path / "b", {"tokenizer_file": str(bpe / "tokenizer.json")}, plugins)
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (tmp_path / "bert" / "model.safetensors").write_bytes(b"")
    assert not fmt.can_import(tmp_path / "bert") and not fmt.can_import(tmp_path / "nothing")
    with pytest.raises(CheckpointError, match="model_type 'bert'"):
        fmt.import_run(tmp_path / "bert", tmp_path / "c", {}, plugins)
    with pytest.raises(CheckpointError, match="use `mega import/export`|does not hold training checkpoints"):
        fmt.save({}, tmp_path)


def test_a_failed_export_leaves_nothing_and_an_existing_destination_is_refused_untouched(tmp_path, bpe, plugins,
                                                                                          monkeypatch):
    from mega.plugins.checkpoints.huggingface import HuggingFaceFormat

    _, src = _hf_dir(tmp_path, bpe)
    run_dir = tmp_path / "imported"
    assert main(["import", str(src), str(run_dir)]) == 0
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="already exists"):
        HuggingFaceFormat().export_run(run_dir, out, {}, plugins)
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"

    def no_space(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(HuggingFaceFormat, "_write_tokenizer", staticmethod(no_space))  # after the weights are written
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(OSError, match="No space left"):
        main(["export", str(run_dir), str(tmp_path / "fresh"), "--to", "huggingface"])
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no DEST, no temporary directory
    monkeypatch.undo()
    assert main(["export", str(run_dir), str(tmp_path / "fresh"), "--to", "huggingface"]) == 0
    assert sorted(p.name for p in (tmp_path / "fresh").iterdir()) == ["config.json", "model.safetensors",
                                                                       "tokenizer.json", "tokenizer_config.json"]


def _logits_at_this_layout(parallel, run_dir: str, tokens: torch.Tensor):
    """(this rank's QKV rows, logits gathered over the vocabulary) of the run loaded at
    the current layout (resharded from its TP=1 checkpoint)."""
    model, tokenizer, _ = restore(run_dir)
    qkv = model.state_dict()["language_model.encoder.layers.0.self_attention.query_key_value.weight"]
    with torch.no_grad():
        return qkv.shape[0], model(tokens)[..., :tokenizer.vocab_size]


@pytest.mark.slow
def test_an_imported_gpt2_gives_hf_logits_at_tensor_parallel_2(tmp_path, bpe):
    from mega.testing import run_ranks

    hf_model, src = _hf_dir(tmp_path, bpe)
    run_dir = tmp_path / "imported"
    assert main(["import", str(src), str(run_dir)]) == 0
    tokens = _tokens(_vocab(bpe))
    with torch.no_grad():
        theirs = hf_model(tokens).logits
    results = run_ranks(_logits_at_this_layout, world=2, tp=2, args=(str(run_dir), tokens), timeout=180)
    for rank, (qkv_rows, ours) in enumerate(results):
        assert qkv_rows == 3 * 32 // 2, rank  # really split: half of the fused QKV rows per rank
        assert ours.shape == theirs.shape
        diff = float((ours - theirs).abs().max())
        print(f"TP=2 rank {rank}: HF -> mega max |dlogit| = {diff:.3g}")
        assert diff < 1e-5, (rank, diff)


# --- (b) mega -> HF -> mega -----------------------------------------------------------------


def _mega_experiment(tmp_path: Path, bpe_dir: Path) -> Path:
    from mega.testing import tiny_raw

    corpus = write_corpus(tmp_path / "corpus.txt")
    raw = tiny_raw(tmp_path, corpus, trainer={"max_steps": 2, "val_check_interval": 0},
                   model={"activation": "gelu_tanh", "ffn_hidden_size": 64,
                          "tokenizer": {"library": "huggingface", "tokenizer_file": str(bpe_dir / "tokenizer.json")}})
    path = tmp_path / "exp.toml"
    path.write_text(tomli_w.dumps(raw))
    return path


def _mega_to_hf_to_mega(tmp_path: Path, run_dir: Path, plugins) -> tuple:
    model, tokenizer, _ = restore(run_dir, plugins)
    out = tmp_path / "hf"
    assert main(["export", str(run_dir), str(out), "--to", "huggingface"]) == 0
    assert (out / "tokenizer.json").is_file() and not (out / "pytorch_model.bin").exists()
    hf_model = GPT2LMHeadModel.from_pretrained(out).eval()
    tokens = _tokens(tokenizer.vocab_size, seed=2)
    to_hf = _max_diff(model, hf_model, tokens)
    assert main(["import", str(out), str(tmp_path / "back")]) == 0
    again, tok2, config = restore(tmp_path / "back", plugins)
    with torch.no_grad():
        a, b = model(tokens)[..., :tokenizer.vocab_size], again(tokens)[..., :tokenizer.vocab_size]
    back = float((a - b).abs().max())
    assert tok2.encode(AWKWARD[4]) == tokenizer.encode(AWKWARD[4])
    return to_hf, back


def test_mega_to_hf_to_mega(tmp_path, bpe, plugins):
    exp = _mega_experiment(tmp_path, bpe)
    assert main(["run", str(exp)]) == 0
    to_hf, back = _mega_to_hf_to_mega(tmp_path, tmp_path / "results" / "tiny", plugins)
    print(f"TP=1: mega -> HF max |dlogit| = {to_hf:.3g}; mega -> HF -> mega {back:.3g}")
    assert to_hf < 1e-5 and back == 0.0


@pytest.mark.slow
def test_mega_to_hf_to_mega_from_tensor_parallel_2(tmp_path, bpe, plugins):
    exp = _mega_experiment(tmp_path, bpe)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RANK", None)
    proc = subprocess.run([sys.executable, "-m", "mega", "run", str(exp), "trainer.devices=2",
                           "model.tensor_model_parallel_size=2", "trainer.accelerator=cpu"],
                          capture_output=True, text=True, timeout=240, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = tmp_path / "results" / "tiny" / "checkpoints" / "step_0000002"
    assert (ckpt / "mp_rank_01").is_dir()
    to_hf, back = _mega_to_hf_to_mega(tmp_path, tmp_path / "results" / "tiny", plugins)
    print(f"TP=2: mega -> HF max |dlogit| = {to_hf:.3g}; mega -> HF -> mega {back:.3g}")
    assert to_hf < 1e-5 and back == 0.0


def test_export_refuses_models_gpt2_cannot_hold(tmp_path, plugins):
    from mega.config import config_from_dict
    from mega.checkpoint import save_model_checkpoint

    stack = {"num_layers": 1, "hidden_size": 16, "num_attention_heads": 4}
    config = config_from_dict({"model": {"name": "bart", "seq_length": 8, "seq_length_dec": 8, "encoder": dict(stack),
                                         "decoder": dict(stack), "tokenizer": {"library": "bytes"}},
                               "exp_manager": {"exp_dir": str(tmp_path), "name": "bart"}}, plugins=plugins)
    tokenizer = plugins.tokenizers.get("bytes").factory(config.model.tokenizer, [], None)
    model = plugins.models.get("bart").factory(config.model, tokenizer, plugins)
    save_model_checkpoint(tmp_path / "bart", config, model, tokenizer, plugins)
    fmt = plugins.checkpoint_formats.get("huggingface").factory()
    with pytest.raises(CheckpointError, match="model 'bart' cannot be written as GPT2LMHeadModel"):
        fmt.export_run(tmp_path / "bart", tmp_path / "out", {}, plugins)
    assert not (tmp_path / "out").exists()


# --- (d) the quickstart model: a sentencepiece tokenizer mega trains, to Hugging Face and back ----

SPM_AWKWARD = [t for t in AWKWARD if EOT not in t] + [
    "ﬁ ligature ① ＦＵＬＬＷＩＤＴＨ ½ ™ ㍻",  # NFKC (sentencepiece's nmt_nfkc table)
    "x\u0301\u0302 combining, \u200bzero\u200cwidth\ufeff",
    "def f(x):\n    return x ** 2  # squares\t\t",
    "    ",
    "\x00\x07 control \x1b[0m",
]


def test_the_quickstart_model_goes_to_hugging_face_and_back(tmp_path, plugins):
    """Issue 20, item 19: a sentencepiece run (the quickstart's tokenizer, trained by mega)
    exported to Hugging Face wrote no tokenizer, and `mega import` had no option for one.
    Now AutoTokenizer loads the exported directory and gives the ids of mega's tokenizer,
    GPT2LMHeadModel gives mega's logits, and `mega import` of the directory gives back the
    very tokenizer (its sentencepiece model) and logits."""
    overrides = ["trainer.max_steps=2", "trainer.val_check_interval=0", "model.num_layers=2", "model.hidden_size=64",
                 "model.seq_length=32", "model.micro_batch_size=2", "model.global_batch_size=2",
                 f"exp_manager.exp_dir={tmp_path / 'results'}"]
    assert main(["run", str(ROOT / "examples" / "quickstart.toml"), *overrides]) == 0
    run_dir = tmp_path / "results" / "quickstart"
    model, tokenizer, config = restore(run_dir, plugins)
    assert config.model.tokenizer.library == "sentencepiece" and tokenizer.vocab_size == 4000

    out = tmp_path / "hf"
    assert main(["export", str(run_dir), str(out), "--to", "huggingface"]) == 0
    assert {"tokenizer.json", "tokenizer.model", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    assert len(theirs) == tokenizer.vocab_size
    assert (theirs.eos_token_id, theirs.pad_token_id) == (tokenizer.eos_id, tokenizer.pad_id)
    unk = tokenizer.sp.unk_id()
    for text in SPM_AWKWARD:
        ids = tokenizer.encode(text)
        assert theirs.encode(text) == ids, text
        if unk not in ids:  # sentencepiece writes an unknown piece as " ⁇ ", transformers as "<unk>"
            assert theirs.decode(ids) == tokenizer.decode(ids), text
    hf_model = GPT2LMHeadModel.from_pretrained(out).eval()
    tokens = torch.tensor([tokenizer.encode(SPM_AWKWARD[0] + " " + SPM_AWKWARD[-3])[:32]])
    with torch.no_grad():
        ours = model(tokens)[..., :tokenizer.vocab_size]
        assert float((ours - hf_model(tokens).logits).abs().max()) < 1e-5

    assert main(["import", str(out), str(tmp_path / "back")]) == 0
    again, tok2, config2 = restore(tmp_path / "back", plugins)
    assert config2.model.tokenizer.library == "sentencepiece"
    assert (tmp_path / "back" / "checkpoints").is_dir() and tok2.sp.serialized_model_proto() == tokenizer.sp.serialized_model_proto()
    for text in SPM_AWKWARD:
        assert tok2.encode(text) == tokenizer.encode(text), text
    with torch.no_grad():
        assert torch.equal(again(tokens)[..., :tokenizer.vocab_size], ours)


def test_a_sentencepiece_model_is_named_with_an_option_on_import(tmp_path, plugins):
    """`--option tokenizer_model=PATH` names a sentencepiece model for a directory that has
    none (or to use instead of its own)."""
    from mega.plugins.tokenizers.sentencepiece import SentencePieceConfig, train_sentencepiece

    corpus = write_corpus(tmp_path / "corpus.txt", lines=200)
    spm = train_sentencepiece([corpus], tmp_path / "spm" / "tok", SentencePieceConfig(vocab_size=200))
    hf_model = _hf_model(200)
    hf_model.save_pretrained(tmp_path / "hf")
    fmt = plugins.checkpoint_formats.get("huggingface").factory()
    with pytest.raises(CheckpointError, match=r"has no tokenizer files mega reads.*--option tokenizer_model=PATH"):
        fmt.import_run(tmp_path / "hf", tmp_path / "nope", {}, plugins)
    with pytest.raises(ConfigError, match="--option tokenizer_model=.*: no such file"):
        fmt.import_run(tmp_path / "hf", tmp_path / "nope", {"tokenizer_model": str(tmp_path / "missing.model")}, plugins)
    fmt.import_run(tmp_path / "hf", tmp_path / "run", {"tokenizer_model": str(spm)}, plugins)
    model, tokenizer, config = restore(tmp_path / "run", plugins)
    assert config.model.tokenizer.library == "sentencepiece" and tokenizer.vocab_size == 200
    assert _max_diff(model, hf_model, _tokens(200)) < 1e-5
