"""`mega export --to megatron` and `mega import` of Megatron-LM checkpoints, checked against
Hugging Face's own converters (transformers 4.47.1, the last wheel shipping them), run
in-process and offline, with GPT2LMHeadModel as the independent forward pass.

Logits are compared on the real vocabulary only (converters keep or cut the padding rows).
"""
from __future__ import annotations

import argparse
import sys
import types
import zipfile

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402
from transformers.models.megatron_gpt2 import checkpoint_reshaping_and_interoperability as reshaping  # noqa: E402
from transformers.models.megatron_gpt2 import convert_megatron_gpt2_checkpoint as convert_gpt2  # noqa: E402

from mega.errors import ConfigError  # noqa: E402
from mega.checkpoint import restore  # noqa: E402
from mega.checkpoint import find_exporter, find_importer, write_imported_run  # noqa: E402

VOCAB = 258  # the bytes tokenizer
MODEL = {"name": "gpt", "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 16,
         "make_vocab_size_divisible_by": 8, "hidden_dropout": 0.0, "attention_dropout": 0.0,
         "tokenizer": {"library": "bytes"}}
SAFE = [argparse.Namespace, types.SimpleNamespace]


def _tokens():
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(7))


def _mega_run(tmp_path, plugins, activation="gelu_tanh", seed=0):
    """A mega run directory holding a random GPT (what training would leave)."""
    from mega.config import config_from_dict

    raw = {"model": dict(MODEL, activation=activation)}
    mc = config_from_dict(raw, plugins=plugins).model
    tok = plugins.tokenizers.get("bytes").factory(mc.tokenizer, [], None)
    torch.manual_seed(seed)
    model = plugins.models.get("gpt").factory(mc, tok, plugins)
    with torch.no_grad():  # LayerNorms away from 1/0, so a mapping mistake shows
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    write_imported_run(tmp_path / "run", raw, {k: v.clone() for k, v in model.state_dict().items()}, plugins)
    return tmp_path / "run"


def _mega_logits(run_dir, plugins):
    model, _, _ = restore(run_dir, plugins)
    with torch.no_grad():
        return model(_tokens())[..., :VOCAB]


def _hf_logits(model):
    model.eval()
    with torch.no_grad():
        return model(_tokens()).logits[..., :VOCAB]


def _close(a, b, what):
    delta = (a - b).abs().max().item()
    print(f"max |dlogit| {what}: {delta:.3g}")
    assert delta < 1e-5, f"{what}: max |dlogit| {delta}"
    return delta


def _export(run_dir, dest, plugins, tp=1, pp=1):
    from mega.checkpoint import resolve_checkpoint

    return find_exporter("megatron", plugins).export_run(
        resolve_checkpoint(run_dir), dest, {"tensor_parallel": str(tp), "pipeline_parallel": str(pp)}, plugins)


# --- mega -> Megatron-LM files -> Hugging Face -------------------------------------------------


@pytest.mark.parametrize("activation", ["gelu_tanh", "gelu"])
def test_export_tp1_reads_in_hf_gpt2_converter(tmp_path, plugins, activation):
    """convert_megatron_gpt2_checkpoint: one rank's file, its activation from our args."""
    run = _mega_run(tmp_path, plugins, activation)
    dest = _export(run, tmp_path / "meg", plugins)
    assert (dest / "latest_checkpointed_iteration.txt").read_text().strip() == "0"
    with torch.serialization.safe_globals(SAFE):
        sd = torch.load(dest / "iter_0000000" / "mp_rank_00" / "model_optim_rng.pt", weights_only=True)
    args = sd["args"]
    # what HF's main() derives from args
    act = "gelu_fast" if args.bias_gelu_fusion else "gelu_new" if args.openai_gelu else "gelu"
    assert act == {"gelu_tanh": "gelu_new", "gelu": "gelu"}[activation]
    config = GPT2Config(activation_function=act, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    out = convert_gpt2.convert_megatron_checkpoint(None, sd, config)
    hf = GPT2LMHeadModel(config)
    missing, _ = hf.load_state_dict(out, strict=False)  # attn.bias / masked_bias are HF buffers it no longer saves
    assert not missing
    _close(_hf_logits(hf), _mega_logits(run, plugins), f"mega->megatron TP=1->HF gpt2 converter ({activation})")


class _Captured(Exception):
    pass


def _hf_from_megatron(iter_dir, tmp_path, monkeypatch, allow=True):
    """checkpoint_reshaping_and_interoperability's Megatron->HF direction, in-process and
    offline. Its 4.47.1 save step looks tensors up in the Megatron dict (KeyError), so the
    converted state dict is taken where it is handed to the sharding helper. `allow`: with
    its own allow-list for `args` (else the caller's)."""
    captured = {}

    def capture(state_dict, **kwargs):
        captured.update(state_dict)
        raise _Captured

    class NoHubTokenizer:
        @staticmethod
        def from_pretrained(name):
            return types.SimpleNamespace(save_pretrained=lambda path: None)

    monkeypatch.setattr(reshaping, "split_torch_state_dict_into_shards", capture)
    monkeypatch.setattr(reshaping, "AutoTokenizer", NoHubTokenizer)
    save = tmp_path / "hf"
    save.mkdir()
    args = argparse.Namespace(load_path=str(iter_dir), save_path=str(save), print_checkpoint_structure=False,
                              tokenizer_name=None, max_shard_size="10GB")
    with torch.serialization.safe_globals(SAFE if allow else []), pytest.raises(_Captured):
        reshaping.convert_checkpoint_from_megatron_to_transformers(args)
    config = GPT2Config.from_pretrained(save)
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
    hf = GPT2LMHeadModel(config)
    missing, _ = hf.load_state_dict(captured, strict=False)
    assert not missing
    return hf, config


@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 1), (2, 2)])
def test_export_reads_in_hf_reshaping_converter(tmp_path, plugins, monkeypatch, tp, pp):
    run = _mega_run(tmp_path, plugins)
    dest = _export(run, tmp_path / "meg", plugins, tp, pp)
    names = sorted(p.name for p in (dest / "iter_0000000").iterdir())
    assert names == [f"mp_rank_{r:02d}" + (f"_{s:03d}" if pp > 1 else "") for r in range(tp) for s in range(pp)]
    hf, config = _hf_from_megatron(dest / "iter_0000000", tmp_path, monkeypatch)
    assert config.vocab_size == VOCAB and config.activation_function == "gelu_new"  # orig_vocab_size honoured
    _close(_hf_logits(hf), _mega_logits(run, plugins), f"mega->megatron TP={tp} PP={pp}->HF reshaping converter")


# --- Hugging Face -> Megatron-LM files (HF's writer) -> mega import -----------------------------


def _stub_megatron(tmp_path):
    """The converter imports Megatron-LM only for its vocabulary padding rule."""
    root = tmp_path / "stub"
    tok = root / "megatron" / "training" / "tokenizer"
    tok.mkdir(parents=True)
    (root / "megatron" / "core").mkdir()
    for d in (root / "megatron", root / "megatron" / "core", root / "megatron" / "training", tok):
        (d / "__init__.py").write_text("")
    (root / "megatron" / "core" / "package_info.py").write_text('__version__ = "0.6.0"\n')
    (tok / "tokenizer.py").write_text(
        "def _vocab_size_with_padding(orig_vocab_size, args):\n"
        "    multiple = args.make_vocab_size_divisible_by * args.tensor_model_parallel_size\n"
        "    return -(-orig_vocab_size // multiple) * multiple\n")
    return root


def _hf_to_megatron(tmp_path, monkeypatch, activation="gelu_new", tp=2, pp=1, vocab=VOCAB):
    """A random GPT2LMHeadModel, written as Megatron-LM files by HF's own HF->Megatron converter."""
    torch.manual_seed(1)
    config = GPT2Config(vocab_size=vocab, n_positions=16, n_embd=32, n_layer=2, n_head=4, activation_function=activation,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = GPT2LMHeadModel(config).eval()
    hf.save_pretrained(tmp_path / "hf", safe_serialization=False)
    monkeypatch.setattr(sys, "path", list(sys.path))
    for name in [m for m in sys.modules if m == "megatron" or m.startswith("megatron.")]:
        monkeypatch.delitem(sys.modules, name)
    args = argparse.Namespace(
        load_path=str(tmp_path / "hf"), save_path=str(tmp_path / "meg"), megatron_path=str(_stub_megatron(tmp_path)),
        target_tensor_model_parallel_size=tp, target_pipeline_model_parallel_size=pp, target_data_parallel_size=1,
        target_params_dtype="fp32", make_vocab_size_divisible_by=8, use_distributed_optimizer=False,
        print_checkpoint_structure=False)
    try:
        reshaping.convert_checkpoint_from_transformers_to_megatron(args)
    finally:
        for name in [m for m in sys.modules if m == "megatron" or m.startswith("megatron.")]:
            del sys.modules[name]
    return hf, tmp_path / "meg"


@pytest.mark.parametrize("activation, tp, pp", [("gelu_new", 2, 1), ("gelu_fast", 2, 1), ("gelu", 1, 1),
                                                ("gelu_new", 1, 2)])
def test_import_of_hf_written_megatron_files(tmp_path, plugins, monkeypatch, activation, tp, pp):
    """HF's writer: SimpleNamespace args, `release`, word_embeddings_for_head even at PP=1,
    padding rows copied from the last real row; the activation from its flags."""
    hf, meg = _hf_to_megatron(tmp_path, monkeypatch, activation, tp, pp)
    assert (meg / "latest_checkpointed_iteration.txt").read_text() == "release"
    fmt = find_importer(meg, plugins)
    assert fmt.name == "megatron"
    fmt.import_run(meg, tmp_path / "run", {"tokenizer": "bytes"}, plugins)
    _, _, config = restore(tmp_path / "run", plugins)
    assert config.model.activation == ("gelu" if activation == "gelu" else "gelu_tanh")
    assert config.model.make_vocab_size_divisible_by == 8 * tp  # mega's padded size is the checkpoint's at TP=1
    _close(_hf_logits(hf), _mega_logits(tmp_path / "run", plugins),
           f"HF ({activation})->megatron TP={tp} PP={pp} (HF writer)->mega import")


def test_cli_import_needs_a_tokenizer_and_says_which_option(tmp_path, plugins, monkeypatch):
    from mega.cli import main

    _, meg = _hf_to_megatron(tmp_path, monkeypatch)
    with pytest.raises(ConfigError, match=r"--option tokenizer_model=PATH .* or --option tokenizer=bytes"):
        find_importer(meg, plugins).import_run(meg, tmp_path / "nope", {}, plugins)
    assert main(["import", str(meg / "release"), str(tmp_path / "run"), "--option", "tokenizer=bytes"]) == 0
    assert (tmp_path / "run" / "config.toml").is_file()


# --- mega -> Megatron-LM -> mega ------------------------------------------------------------------


@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 2)])
def test_export_then_import_gives_the_same_model(tmp_path, plugins, tp, pp):
    from mega.cli import main

    run = _mega_run(tmp_path, plugins, "gelu")
    dest = tmp_path / "meg"
    assert main(["export", str(run), str(dest), "--to", "megatron", "--option", f"tensor_parallel={tp}",
                 "--option", f"pipeline_parallel={pp}"]) == 0
    find_importer(dest, plugins).import_run(dest, tmp_path / "back", {}, plugins)  # the tokenizer from args
    _, _, config = restore(tmp_path / "back", plugins)
    assert config.model.activation == "gelu"
    assert torch.equal(_mega_logits(tmp_path / "back", plugins), _mega_logits(run, plugins))


def test_ngc_style_zip_and_single_file_import(tmp_path, plugins):
    run = _mega_run(tmp_path, plugins)
    dest = _export(run, tmp_path / "meg", plugins)
    archive = tmp_path / "model.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.write(dest / "iter_0000000" / "mp_rank_00" / "model_optim_rng.pt", "release/mp_rank_00/model_optim_rng.pt")
    for i, source in enumerate([archive, dest / "iter_0000000" / "mp_rank_00" / "model_optim_rng.pt",
                                dest / "iter_0000000"]):
        fmt = find_importer(source, plugins)
        assert fmt.name == "megatron"
        fmt.import_run(source, tmp_path / f"run{i}", {}, plugins)
        assert torch.equal(_mega_logits(tmp_path / f"run{i}", plugins), _mega_logits(run, plugins))


def test_export_refuses_a_layout_the_model_cannot_split(tmp_path, plugins):
    run = _mega_run(tmp_path, plugins)
    with pytest.raises(ConfigError, match="num_attention_heads=4 is not divisible by --option tensor_parallel=3"):
        _export(run, tmp_path / "meg", plugins, tp=3)


def test_sentencepiece_tokenizer_travels_through_args(tmp_path, plugins, corpus):
    """Export names Megatron's GPTSentencePieceTokenizer and a copy of the model file;
    import finds it there, or takes --option tokenizer_model=PATH."""
    from mega.config import config_from_dict
    from mega.checkpoint import resolve_checkpoint

    tok_cfg = config_from_dict({"model": {"tokenizer": {"vocab_size": 60}}}, plugins=plugins).model.tokenizer
    tok = plugins.tokenizers.get("sentencepiece").factory(tok_cfg, [corpus], tmp_path)
    raw = {"model": dict(MODEL, tokenizer={"library": "sentencepiece", "model": str(tmp_path / "tokenizer.model")})}
    mc = config_from_dict(raw, plugins=plugins).model
    model = plugins.models.get("gpt").factory(mc, tok, plugins)
    write_imported_run(tmp_path / "run", raw, model.state_dict(), plugins)
    dest = find_exporter("megatron", plugins).export_run(resolve_checkpoint(tmp_path / "run"), tmp_path / "meg", {}, plugins)
    with torch.serialization.safe_globals(SAFE):
        args = torch.load(dest / "iter_0000000" / "mp_rank_00" / "model_optim_rng.pt", weights_only=True)["args"]
    assert args.tokenizer_type == "GPTSentencePieceTokenizer" and (dest / "tokenizer.model").is_file()
    assert args.tokenizer_model == str((dest / "tokenizer.model").absolute()) and args.orig_vocab_size == 60
    importer = find_importer(dest, plugins)
    importer.import_run(dest, tmp_path / "a", {}, plugins)
    importer.import_run(dest, tmp_path / "b", {"tokenizer_model": str(tmp_path / "tokenizer.model")}, plugins)
    for name in ("a", "b"):
        loaded, tokenizer, config = restore(tmp_path / name, plugins)
        assert config.model.tokenizer.library == "sentencepiece" and tokenizer.vocab_size == 60
        tokens = torch.randint(0, 60, (1, 16))
        assert torch.equal(loaded(tokens), model.eval()(tokens))


# --- review fixes: GPT-2 BPE tokenizers travel; exports renamed into place ------------------


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A tiny byte-level BPE (GPT-2's kind) as vocab.json + merges.txt and as tokenizer.json."""
    from tokenizers import ByteLevelBPETokenizer

    from mega.testing import write_corpus

    d = tmp_path_factory.mktemp("bpe")
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(write_corpus(d / "corpus.txt", lines=60).read_text().splitlines(), vocab_size=300,
                            min_frequency=2, special_tokens=["<|endoftext|>"], show_progress=False)
    tok.save(str(d / "tokenizer.json"))
    tok.save_model(str(d))
    return d


def _bpe_run(tmp_path, plugins, bpe, kind):
    from mega.config import config_from_dict

    tok = ({"library": "huggingface", "tokenizer_file": str(bpe / "tokenizer.json")} if kind == "json" else
           {"library": "huggingface", "vocab_file": str(bpe / "vocab.json"), "merges_file": str(bpe / "merges.txt")})
    raw = {"model": dict(MODEL, tokenizer=tok)}
    mc = config_from_dict(raw, plugins=plugins).model
    tokenizer = plugins.tokenizers.get("huggingface").factory(mc.tokenizer, [], None)
    torch.manual_seed(3)
    model = plugins.models.get("gpt").factory(mc, tokenizer, plugins)
    write_imported_run(tmp_path / "run", raw, model.state_dict(), plugins)
    return tmp_path / "run", model.eval(), tokenizer


@pytest.mark.parametrize("kind", ["vocab_merges", "json"])
def test_gpt2_bpe_tokenizer_travels_through_megatron(tmp_path, plugins, bpe, kind):
    """Export names GPT2BPETokenizer + vocab_file/merge_file (or HuggingFaceTokenizer +
    tokenizer_model = tokenizer.json) and copies the files; import reads them back, also
    after the export was moved (by file name beside the tracker)."""
    run, model, tokenizer = _bpe_run(tmp_path, plugins, bpe, kind)
    dest = _export(run, tmp_path / "meg", plugins)
    with torch.serialization.safe_globals(SAFE):
        args = torch.load(dest / "iter_0000000" / "mp_rank_00" / "model_optim_rng.pt", weights_only=True)["args"]
    if kind == "vocab_merges":
        assert (args.tokenizer_type, args.vocab_file, args.merge_file) == (
            "GPT2BPETokenizer", str(dest / "vocab.json"), str(dest / "merges.txt"))
        assert (dest / "vocab.json").read_bytes() == (bpe / "vocab.json").read_bytes()
    else:
        assert (args.tokenizer_type, args.tokenizer_model) == ("HuggingFaceTokenizer", str(dest / "tokenizer.json"))
        assert (dest / "tokenizer.json").is_file()
    moved = tmp_path / "moved"
    dest.rename(moved)
    for i, source in enumerate([moved, moved / "iter_0000000"]):
        find_importer(source, plugins).import_run(source, tmp_path / f"back{i}", {}, plugins)
        loaded, tok, config = restore(tmp_path / f"back{i}", plugins)
        assert config.model.tokenizer.library == "huggingface" and tok.vocab_size == tokenizer.vocab_size
        assert tok.encode("the model said") == tokenizer.encode("the model said")
        tokens = torch.randint(0, tokenizer.vocab_size, (1, 16))
        assert torch.equal(loaded(tokens), model(tokens))


def test_hf_written_gpt2_bpe_files_import_with_file_options(tmp_path, plugins, monkeypatch, bpe):
    """HF's writer says GPT2BPETokenizer and ships no files: the options name them."""
    from mega.cli import main

    vocab = len(__import__("json").loads((bpe / "vocab.json").read_text()))
    hf, meg = _hf_to_megatron(tmp_path, monkeypatch, tp=1, vocab=vocab)
    with pytest.raises(ConfigError, match="--option vocab_file=PATH with --option merges_file=PATH"):
        find_importer(meg, plugins).import_run(meg, tmp_path / "nope", {}, plugins)
    assert main(["import", str(meg), str(tmp_path / "run"), "--option", f"vocab_file={bpe / 'vocab.json'}",
                 "--option", f"merges_file={bpe / 'merges.txt'}"]) == 0
    assert main(["import", str(meg), str(tmp_path / "run2"), "--option", f"tokenizer_file={bpe / 'tokenizer.json'}"]) == 0
    for name in ("run", "run2"):
        loaded, tok, _ = restore(tmp_path / name, plugins)
        tokens = torch.randint(0, vocab, (2, 16))
        with torch.no_grad():
            delta = (loaded(tokens)[..., :vocab] - hf(tokens).logits).abs().max().item()
        assert delta < 1e-5 and tok.vocab_size == vocab


def test_export_writes_into_a_temporary_directory_renamed_into_place(tmp_path, plugins, monkeypatch):
    from mega.errors import CheckpointError
    from mega.plugins.checkpoints.megatron import interop as megatron_interop

    run = _mega_run(tmp_path, plugins)
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="already exists"):
        _export(run, existing, plugins)
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(megatron_interop, "nest", broken)  # fails after the tokenizer and the first folders
    with pytest.raises(OSError, match="disk full"):
        _export(run, tmp_path / "meg", plugins, tp=2)
    assert not (tmp_path / "meg").exists() and not list(tmp_path.glob(".tmp-*"))
    monkeypatch.undo()
    dest = _export(run, tmp_path / "meg", plugins)
    assert (dest / "latest_checkpointed_iteration.txt").is_file() and not list(tmp_path.glob(".tmp-*"))


def test_reading_megatron_files_leaves_the_callers_safe_globals_as_they_were(tmp_path, plugins, monkeypatch):
    """Issue 20, item 18: torch's `safe_globals` context manager removes on exit every
    global it added, even one the caller had allowed before; mega's reader used it, so a
    script that allowed argparse.Namespace, imported a Megatron checkpoint and then ran Hugging
    Face's converter in the same process had the converter's torch.load refused."""
    import pathlib

    run = _mega_run(tmp_path, plugins)
    dest = _export(run, tmp_path / "meg", plugins)
    assert argparse.Namespace not in torch.serialization.get_safe_globals()
    with torch.serialization.safe_globals(SAFE):  # the caller's own allow-list
        find_importer(dest, plugins).import_run(dest, tmp_path / "imported", {}, plugins)
        now = torch.serialization.get_safe_globals()
        assert set(SAFE) <= set(now) and pathlib.PosixPath not in now  # the caller's kept; mega's own taken back
        sd = torch.load(dest / "iter_0000000" / "mp_rank_00" / "model_optim_rng.pt", weights_only=True)
        hf, _ = _hf_from_megatron(dest / "iter_0000000", tmp_path, monkeypatch, allow=False)  # HF's converter
    assert sd["args"].mega_model == "gpt" and argparse.Namespace not in torch.serialization.get_safe_globals()
    _close(_hf_logits(hf), _mega_logits(tmp_path / "imported", plugins), "mega->megatron->HF after a mega import")
