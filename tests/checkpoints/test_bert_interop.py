"""Megatron-BERT conversions: transformers' eight MegatronBert* classes (`mega export --to hf`,
`mega import` of their directories), Megatron-LM's legacy layout read by transformers' own
`convert_megatron_bert_checkpoint.py` (run in-process), and NGC's release zip. Every model
is built locally from a tiny config; nothing is downloaded."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import MegatronBertConfig  # noqa: E402

from mega.plugins.models.bert_interop import huggingface as hfb  # noqa: E402

HEADS, HIDDEN, LAYERS = 4, 32, 2
CLASSES = list(hfb.ARCHITECTURES.values())


def _randomised(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Noise on every parameter: biases and LayerNorms start at 0 / 1, which would hide a
    mapping mistake in them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def _hf_config(vocab: int, arch: str, **extra) -> MegatronBertConfig:
    labels = {"MegatronBertForSequenceClassification": 3, "MegatronBertForTokenClassification": 5,
              "MegatronBertForQuestionAnswering": 2}.get(arch, 2)
    return MegatronBertConfig(vocab_size=vocab, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                              intermediate_size=64, max_position_embeddings=32, hidden_act="gelu", layer_norm_eps=1e-5,
                              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=labels,
                              is_decoder=arch == "MegatronBertForCausalLM", **extra)


def _hf_model(vocab: int, arch: str, seed: int = 0, **extra):
    torch.manual_seed(seed)
    return _randomised(getattr(transformers, arch)(_hf_config(vocab, arch, **extra)), seed)


def test_qkv_split_and_fuse_are_inverse_and_per_head():
    heads, dim, hidden = 4, 3, 5
    fused = torch.randn(heads * 3 * dim, hidden)
    q, k, v = hfb.split_qkv(fused, heads)
    # row (head h, part t, dim d) of the fused tensor is row h*dim + d of part t
    rows = fused.view(heads, 3, dim, hidden)
    assert torch.equal(q.view(heads, dim, hidden), rows[:, 0]) and torch.equal(v.view(heads, dim, hidden), rows[:, 2])
    assert torch.equal(hfb.fuse_qkv(q, k, v, heads), fused)
    bias = torch.randn(heads * 3 * dim)
    assert torch.equal(hfb.fuse_qkv(*hfb.split_qkv(bias, heads), heads), bias)


@pytest.mark.parametrize("arch", ["MegatronBertForPreTraining", "MegatronBertForQuestionAnswering"])
def test_state_dict_mapping_round_trips(arch):
    """HF -> mega names -> HF gives every tensor back (vocabulary padded, then cut); the
    whole path of every class is test_every_class_imports_and_exports_with_equal_logits."""
    vocab, padded = 100, 128
    model = _hf_model(vocab, arch)
    theirs = model.state_dict()
    name = hfb.MODELS[arch]
    ours = hfb.hf_to_mega(theirs, name, LAYERS, HEADS, padded, vocab, "test")
    assert ours["language_model.embedding.word_embeddings.weight"].shape[0] == padded
    assert not any(".query." in k or ".key." in k for k in ours)
    back = hfb.mega_to_hf(ours, name, LAYERS, HEADS, vocab)
    expected = {k: v for k, v in theirs.items() if not hfb.HF_DERIVED.match(k)}
    assert set(back) == set(expected)
    for k, v in expected.items():
        assert torch.equal(back[k], v), k


def test_configs_mega_would_compute_differently_are_refused():
    from mega.errors import CheckpointError

    hf = _hf_config(100, "MegatronBertForMaskedLM").to_dict()
    assert hfb.mega_model_config(hf, "MegatronBertForMaskedLM", "here")["name"] == "bert_masked_lm"
    for change, arch, message in ((dict(is_decoder=True), "MegatronBertForMaskedLM", "is_decoder=true"),
                                  (dict(is_decoder=False), "MegatronBertForCausalLM", "is_decoder=false"),
                                  (dict(hidden_act="relu"), "MegatronBertForMaskedLM", "hidden_act 'relu'"),
                                  (dict(position_embedding_type="relative_key"), "MegatronBertForMaskedLM",
                                   "position_embedding_type='relative_key'")):
        with pytest.raises(CheckpointError, match=f"here: {message}"):
            hfb.mega_model_config({**hf, **change}, arch, "here")


def test_unknown_and_untied_tensors_are_refused():
    from mega.errors import CheckpointError

    model = _hf_model(100, "MegatronBertForPreTraining")
    state = dict(model.state_dict())
    with pytest.raises(CheckpointError, match="tensors MegatronBertForMaskedLM does not have.*bert.encoder.layer.2.ln"):
        hfb.hf_to_mega({**state, "bert.encoder.layer.2.ln.weight": torch.ones(HIDDEN)}, "bert_masked_lm", LAYERS,
                       HEADS, 128, 100, "here")
    state["cls.predictions.decoder.weight"] = state["cls.predictions.decoder.weight"] + 1
    with pytest.raises(CheckpointError, match="differs from the word embedding"):
        hfb.hf_to_mega(state, "bert", LAYERS, HEADS, 128, 100, "here")


# --- the whole path: mega import of transformers' directories, mega export back -----------------


@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory):
    """A BERT-style vocab.txt: [PAD], [unused*], [UNK], [CLS], [SEP], [MASK], then words."""
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    entries = ["[PAD]"] + [f"[unused{i}]" for i in range(20)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    entries += [f"w{i}" for i in range(100 - len(entries))]
    path.write_text("\n".join(entries) + "\n")
    return path


VOCAB = 100


def _batch(arch: str, vocab: int = VOCAB, seed: int = 3) -> dict:
    g = torch.Generator().manual_seed(seed)
    shape = (2, 3, 16) if arch == "MegatronBertForMultipleChoice" else (2, 16)
    tokens = torch.randint(0, vocab, shape, generator=g)
    types = torch.zeros(shape, dtype=torch.long)
    types[..., 9:] = 1
    padding = torch.ones(shape, dtype=torch.long)
    padding[1, ..., 12:] = 0  # the second sample ends with padding
    return {"tokens": tokens, "tokentype_ids": types, "padding_mask": padding}


@torch.no_grad()
def _hf_outputs(model, batch: dict) -> dict:
    out = model(input_ids=batch["tokens"], token_type_ids=batch["tokentype_ids"], attention_mask=batch["padding_mask"])
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


# HF output -> mega's logits() key
OUTPUTS = {"MegatronBertForPreTraining": {"prediction_logits": "prediction_logits",
                                          "seq_relationship_logits": "seq_relationship_logits"},
           "MegatronBertForQuestionAnswering": {"start_logits": "start_logits", "end_logits": "end_logits"}}


def _max_diff(ours: dict, theirs: dict, arch: str, batch: dict, vocab: int = VOCAB) -> float:
    """Largest |difference| over the class's outputs, at real (unpadded) positions only
    (Megatron-LM and HF treat padded query rows differently) and the real vocabulary."""
    real = batch["padding_mask"].reshape(-1, batch["padding_mask"].shape[-1]).bool()
    worst = 0.0
    for hf_key, key in OUTPUTS.get(arch, {"logits": "logits"}).items():
        a, b = ours[key], theirs[hf_key]
        if hf_key in ("prediction_logits", "logits") and a.dim() == 3 and a.shape[-1] > 20:  # vocabulary logits
            a, b = a[..., :vocab], b[..., :vocab]
        assert a.shape == b.shape, (hf_key, a.shape, b.shape)
        if a.dim() >= 2 and a.shape[:2] == real.shape and arch != "MegatronBertForMultipleChoice":
            a, b = a[real], b[real]
        worst = max(worst, float((a - b).abs().max()))
    return worst


def _hf_dir(tmp_path, arch: str, vocab_file, lower: bool = True, save=None, **extra):
    model = _hf_model(VOCAB, arch, **extra)
    out = tmp_path / "hf"
    model.save_pretrained(out, **(save or {}))
    (out / "vocab.txt").write_bytes(vocab_file.read_bytes())
    transformers.BertTokenizer(str(vocab_file), do_lower_case=lower).save_pretrained(out)
    return model, out


def _mega_model(run_dir, plugins):
    from mega.checkpoint import restore

    model, tokenizer, config = restore(run_dir, plugins)
    return model.eval(), tokenizer, config


@pytest.mark.parametrize("arch", CLASSES)
@pytest.mark.slow
def test_every_class_imports_and_exports_with_equal_logits(tmp_path, plugins, vocab_file, arch):
    """transformers class -> `mega import` -> mega logits == HF logits; `mega export --to hf`
    -> from_pretrained of the same class gives back every tensor and the same logits."""
    from mega.cli import main

    hf, hf_dir = _hf_dir(tmp_path, arch, vocab_file,
                         save={"safe_serialization": False, "max_shard_size": "20KB"}
                         if arch == "MegatronBertForTokenClassification" else {})  # sharded pytorch_model-*.bin
    if arch == "MegatronBertForTokenClassification":
        assert (hf_dir / "pytorch_model.bin.index.json").is_file()
    assert main(["import", str(hf_dir), str(tmp_path / "run")]) == 0
    model, tokenizer, config = _mega_model(tmp_path / "run", plugins)
    assert config.model.name == hfb.MODELS[arch] and tokenizer.vocab_size == VOCAB
    assert config.model.layernorm_epsilon == 1e-5
    batch = _batch(arch)
    theirs = _hf_outputs(hf, batch)
    diff = _max_diff(model.logits(batch), theirs, arch, batch)
    print(f"{arch}: HF -> mega max |d| {diff:.3g}")
    assert diff < 1e-5

    assert main(["export", str(tmp_path / "run"), str(tmp_path / "back"), "--to", "hf"]) == 0
    back = getattr(transformers, arch).from_pretrained(tmp_path / "back").eval()
    cfg = back.config
    assert cfg.architectures == [arch] and cfg.model_type == "megatron-bert" and cfg.layer_norm_eps == 1e-5
    assert cfg.vocab_size == VOCAB and cfg.hidden_act == "gelu"
    if arch in ("MegatronBertForSequenceClassification", "MegatronBertForTokenClassification"):
        assert cfg.num_labels == hf.config.num_labels and len(cfg.id2label) == hf.config.num_labels
    expected = hf.state_dict()
    for k, v in back.state_dict().items():
        assert torch.equal(v, expected[k]), k
    # bit for bit against the original loaded the same way (a model fresh from its constructor and the
    # same weights from_pretrained can differ by an ulp: 1.5e-8 for MegatronBertForMultipleChoice)
    original = getattr(transformers, arch).from_pretrained(hf_dir).eval()
    assert _max_diff(_hf_outputs(back, batch), _hf_outputs(original, batch), arch, batch) == 0.0
    tok = transformers.BertTokenizer.from_pretrained(tmp_path / "back")
    assert tok.do_lower_case and len(tok) == VOCAB


# --- Megatron-LM's legacy layout ------------------------------------------------------------

import argparse  # noqa: E402
import types  # noqa: E402
import zipfile  # noqa: E402

from transformers.models.megatron_bert import convert_megatron_bert_checkpoint as convert_bert  # noqa: E402
from tests.helpers.bert_files import MEGA_BERT, NGC, NGC_SHAPE, google_vocab as _google_vocab, ngc_zip as _ngc_zip
from tests.helpers.bert_files import WORDS

SAFE = [argparse.Namespace, types.SimpleNamespace]


def _mega_run(tmp_path, plugins, vocab_file, name="bert", seed=0, **keys):
    """A mega run directory holding a random BERT (what training would leave), LayerNorms
    and biases moved off 1 / 0 so a mapping mistake shows."""
    from mega.config import config_from_dict
    from mega.checkpoint import write_imported_run

    raw = {"model": {"name": name, **MEGA_BERT, **keys,
                     "tokenizer": {"library": "wordpiece", "vocab_file": str(vocab_file), "do_lower_case": True}}}
    mc = config_from_dict(raw, plugins=plugins).model
    tok = plugins.tokenizers.get("wordpiece").factory(mc.tokenizer, [], None)
    torch.manual_seed(seed)
    model = plugins.models.get(name).factory(mc, tok, plugins)
    _randomised(model, seed)
    run = tmp_path / f"run-{name}"
    write_imported_run(run, raw, {k: v.clone() for k, v in model.state_dict().items()}, plugins)
    return run


def _export_megatron(run, dest, tp=1, pp=1):
    from mega.cli import main

    assert main(["export", str(run), str(dest), "--to", "megatron", "--option", f"tensor_parallel={tp}",
                 "--option", f"pipeline_parallel={pp}"]) == 0
    return dest


def _load(path):
    with torch.serialization.safe_globals(SAFE):
        return torch.load(path, weights_only=True)


def _converted(sd: dict, **config) -> "transformers.MegatronBertForPreTraining":
    """transformers' own convert_megatron_bert_checkpoint, in-process (its main() needs a
    zip or .pt path and writes beside it), into MegatronBertForPreTraining."""
    hf_config = MegatronBertConfig(hidden_act="gelu", layer_norm_eps=1e-5, hidden_dropout_prob=0.0,
                                   attention_probs_dropout_prob=0.0, **config)
    out = convert_bert.convert_megatron_checkpoint(None, sd, hf_config)
    model = transformers.MegatronBertForPreTraining(hf_config)
    missing, unexpected = model.load_state_dict(out, strict=False)
    assert missing == ["cls.predictions.decoder.bias"] and not unexpected  # tied to cls.predictions.bias
    return model.eval()


def test_export_reads_in_transformers_bert_converter(tmp_path, plugins, vocab_file):
    """`mega export --to megatron` (TP=1) -> convert_megatron_bert_checkpoint ->
    MegatronBertForPreTraining: its logits are mega's."""
    run = _mega_run(tmp_path, plugins, vocab_file)
    dest = _export_megatron(run, tmp_path / "meg")
    sd = _load(dest / "iter_0000000" / "mp_rank_00" / "model_optim_rng.pt")
    args = sd["args"]
    assert sd["checkpoint_version"] == 3.0 and args.tokenizer_type == "BertWordPieceLowerCase"
    assert args.padded_vocab_size == 104 and args.bert_binary_head and Path(args.vocab_file).name == "vocab.txt"
    assert Path(args.vocab_file).is_file()
    hf = _converted(sd)
    assert hf.config.vocab_size == 104  # the converter keeps Megatron's padded rows
    model, _, _ = _mega_model(run, plugins)
    batch = _batch("MegatronBertForPreTraining")
    diff = _max_diff(model.logits(batch), _hf_outputs(hf, batch), "MegatronBertForPreTraining", batch, vocab=104)
    print(f"mega -> megatron TP=1 -> transformers' converter: max |d| {diff:.3g}")
    assert diff < 1e-5


@pytest.mark.parametrize("name, tp, pp", [("bert", 2, 1), ("bert", 1, 2), ("bert_sequence_classification", 2, 1),
                                          ("bert_multiple_choice", 1, 1)])
def test_export_then_import_gives_the_same_model(tmp_path, plugins, vocab_file, name, tp, pp):
    from mega.cli import main

    keys = {"num_labels": 3} if name == "bert_sequence_classification" else {}
    run = _mega_run(tmp_path, plugins, vocab_file, name, **keys)
    dest = _export_megatron(run, tmp_path / "meg", tp, pp)
    assert main(["import", str(dest), str(tmp_path / "back")]) == 0  # the vocabulary from args
    model, _, config = _mega_model(tmp_path / "back", plugins)
    assert config.model.name == name and config.model.tokenizer.library == "wordpiece"
    original, _, _ = _mega_model(run, plugins)
    arch = hfb.ARCHITECTURES[name]
    batch = _batch(arch)
    assert _max_diff(model.logits(batch), original.logits(batch), arch, batch) == 0.0


def _reorder_qkv(t: torch.Tensor, version: float, heads: int) -> torch.Tensor:
    """A shard's fused QKV rows from the per-head [heads, 3, head_dim] order (version >= 2)
    into an older checkpoint_version's: 0 = [3, heads, head_dim], 1.0 = [heads, head_dim, 3]."""
    if version >= 2.0:
        return t
    rest = t.shape[1:]
    x = t.reshape(heads, 3, -1, *rest)
    x = x.transpose(0, 1) if version == 0 else x.transpose(1, 2)
    return x.reshape(t.shape).contiguous()


def _old_names(model: dict) -> dict:
    """Megatron-LM's pre-2021 spelling: `transformer` for the encoder, `attention.` for
    `self_attention.`."""
    lm = dict(model["language_model"])
    lm["transformer"] = {k.replace("self_attention.", "attention."): v for k, v in lm.pop("encoder").items()}
    return {**model, "language_model": lm}


def _new_names(model: dict) -> dict:
    """Megatron-LM's spelling since Sep 2023: `*_norm` for `*_layernorm`, `lm_head.norm`."""
    lm = dict(model["language_model"])
    lm["encoder"] = {k.replace("layernorm.", "norm."): v for k, v in lm["encoder"].items()}
    head = {k.replace("layernorm.", "norm."): v for k, v in model["lm_head"].items()}
    return {**model, "language_model": lm, "lm_head": head}


@pytest.mark.parametrize("version, tp", [(0, 1), (0, 2), (1.0, 2), (3.0, 2)])
def test_import_of_older_checkpoint_versions(tmp_path, plugins, vocab_file, version, tp):
    """QKV row orders of checkpoint_version 0 and 1.0 per TP shard, with the key names of
    their time (0: pre-2021 `transformer` / `attention.`; 3.0: the post-2023 `*_norm`
    names; 2.0 has 3.0's row order)."""
    from mega.cli import main

    run = _mega_run(tmp_path, plugins, vocab_file)
    dest = _export_megatron(run, tmp_path / "meg", tp)
    for rank in range(tp):
        path = dest / "iter_0000000" / f"mp_rank_{rank:02d}" / "model_optim_rng.pt"
        sd = _load(path)
        encoder = sd["model"]["language_model"]["encoder"]
        for k in [k for k in encoder if "query_key_value" in k]:
            encoder[k] = _reorder_qkv(encoder[k], version, MEGA_BERT["num_attention_heads"] // tp)
        if version == 0:
            del sd["checkpoint_version"]  # files before checkpoint versions had none
            sd["model"] = _old_names(sd["model"])
        else:
            sd["checkpoint_version"] = version
        if version == 3.0:
            sd["model"] = _new_names(sd["model"])
            assert "final_norm.weight" in sd["model"]["language_model"]["encoder"]
        torch.save(sd, path)
    assert main(["import", str(dest), str(tmp_path / "back")]) == 0
    model, _, _ = _mega_model(tmp_path / "back", plugins)
    original, _, _ = _mega_model(run, plugins)
    batch = _batch("MegatronBertForPreTraining")
    assert _max_diff(model.logits(batch), original.logits(batch), "MegatronBertForPreTraining", batch) == 0.0


# --- NGC's megatron_bert_345m release -------------------------------------------------------


def _ngc_reference(archive: Path) -> "transformers.MegatronBertForPreTraining":
    """What transformers' converter makes of the zip (its main() opens the same member)."""
    with zipfile.ZipFile(archive) as z, z.open("release/mp_rank_00/model_optim_rng.pt") as f:
        with torch.serialization.safe_globals(SAFE):
            sd = torch.load(f, weights_only=True)
    config = {}
    if "args" not in sd:  # the converter's main() then takes V from lm_head.bias and the rest from its config
        config = dict(vocab_size=sd["model"]["lm_head"]["bias"].numel(), hidden_size=NGC_SHAPE["hidden"],
                      num_hidden_layers=NGC_SHAPE["layers"], num_attention_heads=NGC_SHAPE["heads"],
                      intermediate_size=NGC_SHAPE["ffn"], max_position_embeddings=NGC_SHAPE["positions"])
    return _converted(sd, **config)


@pytest.mark.parametrize("kind", ["uncased", "cased"])
def test_ngc_release_zip_imports_with_its_vocab(tmp_path, plugins, kind):
    from mega.cli import main

    vocab_size, rows, _ = NGC[kind]
    archive = _ngc_zip(tmp_path / f"megatron_bert_345m_v0_1_{kind}.zip", kind)
    vocab = _google_vocab(tmp_path / "vocab.txt", vocab_size)
    assert main(["import", str(archive), str(tmp_path / "run"), "--option", f"vocab_file={vocab}"]) == 0
    model, tokenizer, config = _mega_model(tmp_path / "run", plugins)
    mc = config.model
    assert (mc.name, mc.add_binary_head, mc.num_tokentypes, tokenizer.vocab_size) == ("bert", True, 2, vocab_size)
    assert model.padded_vocab_size == rows and mc.tokenizer.do_lower_case == (kind == "uncased")
    assert [tokenizer.cls_id, tokenizer.sep_id, tokenizer.mask_id, tokenizer.pad_id] == [101, 102, 103, 0]
    batch = _batch("MegatronBertForPreTraining", vocab=vocab_size)
    hf = _ngc_reference(archive)
    diff = _max_diff(model.logits(batch), _hf_outputs(hf, batch), "MegatronBertForPreTraining", batch, vocab=rows)
    print(f"NGC {kind} zip -> mega vs transformers' converter: max |d| {diff:.3g}")
    assert diff < 1e-5


def test_ngc_zip_errors_name_the_option(tmp_path, plugins, vocab_file):
    from mega.errors import CheckpointError, ConfigError
    from mega.checkpoint import find_importer

    archive = _ngc_zip(tmp_path / "megatron_bert_345m_v0_1_uncased.zip", "uncased")
    fmt = find_importer(archive, plugins)
    assert fmt.name == "megatron"
    with pytest.raises(ConfigError, match=r"args.vocab_file='/workspace/data/bert-vocab.txt' \(not found\).*--option vocab_file=PATH"):
        fmt.import_run(archive, tmp_path / "run", {}, plugins)
    with pytest.raises(CheckpointError, match="the tokenizer has 30600 tokens but the checkpoint only 30592 embedding rows"):
        big = _google_vocab(tmp_path / "big.txt", 30600)
        fmt.import_run(archive, tmp_path / "run", {"vocab_file": str(big)}, plugins)
    assert not (tmp_path / "run").exists()
    bare = _ngc_zip(tmp_path / "bare.zip", "uncased", with_args=False)
    vocab = _google_vocab(tmp_path / "vocab.txt", 30522)
    with pytest.raises(CheckpointError, match="--option num_attention_heads=N"):
        fmt.import_run(bare, tmp_path / "run", {"vocab_file": str(vocab)}, plugins)
    fmt.import_run(bare, tmp_path / "run", {"vocab_file": str(vocab), "num_attention_heads": "2"}, plugins)
    model, _, _ = _mega_model(tmp_path / "run", plugins)
    batch = _batch("MegatronBertForPreTraining", vocab=30522)
    diff = _max_diff(model.logits(batch), _hf_outputs(_ngc_reference(bare), batch), "MegatronBertForPreTraining",
                     batch, vocab=30592)
    assert diff < 1e-5


def test_megatron_classes_in_args_load_as_stand_ins(tmp_path, plugins, monkeypatch):
    """Files whose `args` hold Megatron-LM's own objects (an enum member here) import
    without Megatron-LM installed and without unpickling code: the classes become inert
    stand-ins."""
    import enum
    import sys

    from mega.cli import main
    from mega.plugins.checkpoints.megatron.files import MegatronStandIn, load_file

    fake = types.ModuleType("megatron.model.enums")

    class AttnMaskType(enum.Enum):
        padding = 1
        causal = 2

    AttnMaskType.__module__, AttnMaskType.__qualname__ = "megatron.model.enums", "AttnMaskType"
    fake.AttnMaskType = AttnMaskType
    for name, module in (("megatron", types.ModuleType("megatron")), ("megatron.model", types.ModuleType("megatron.model")),
                         ("megatron.model.enums", fake)):
        monkeypatch.setitem(sys.modules, name, module)
    archive = _ngc_zip(tmp_path / "ngc.zip", "uncased", attn_mask_type=AttnMaskType.padding)
    for name in ("megatron.model.enums", "megatron.model", "megatron"):
        monkeypatch.delitem(sys.modules, name)
    with zipfile.ZipFile(archive) as z, z.open("release/mp_rank_00/model_optim_rng.pt") as f:
        args = load_file(f, "member")["args"]
    assert isinstance(args.attn_mask_type, MegatronStandIn) and args.attn_mask_type.args == (1,)
    vocab = _google_vocab(tmp_path / "vocab.txt", 30522)
    assert main(["import", str(archive), str(tmp_path / "run"), "--option", f"vocab_file={vocab}"]) == 0
    assert "megatron" not in sys.modules


def test_bert_without_binary_head_or_token_types_exports_as_masked_lm(tmp_path, plugins, vocab_file):
    """Megatron-LM's --bert-no-binary-head model (no pooler, binary head or token types) is
    transformers' MegatronBertForMaskedLM, with a zero token-type row; both ways it
    computes the same logits, and Megatron files of it import back."""
    from mega.cli import main

    run = _mega_run(tmp_path, plugins, vocab_file, add_binary_head=False, num_tokentypes=0)
    assert main(["export", str(run), str(tmp_path / "hf"), "--to", "hf"]) == 0
    hf = transformers.MegatronBertForMaskedLM.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.type_vocab_size == 1 and not hf.bert.embeddings.token_type_embeddings.weight.any()
    model, _, _ = _mega_model(run, plugins)
    batch = {k: v for k, v in _batch("MegatronBertForMaskedLM").items() if k != "tokentype_ids"}
    theirs = _hf_outputs(hf, {**batch, "tokentype_ids": torch.zeros_like(batch["tokens"])})
    ours = model.logits(batch)  # `bert` names its LM logits as MegatronBertForPreTraining does
    assert _max_diff({"logits": ours["prediction_logits"]}, theirs, "MegatronBertForMaskedLM", batch) < 1e-5
    assert main(["import", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    _, _, config = _mega_model(tmp_path / "back", plugins)
    assert config.model.name == "bert_masked_lm"

    dest = _export_megatron(run, tmp_path / "meg")
    sd = _load(dest / "iter_0000000" / "mp_rank_00" / "model_optim_rng.pt")
    assert not sd["args"].bert_binary_head and "binary_head" not in sd["model"]
    assert main(["import", str(dest), str(tmp_path / "back-meg")]) == 0
    back, _, config = _mega_model(tmp_path / "back-meg", plugins)
    assert (config.model.name, config.model.add_binary_head, config.model.num_tokentypes) == ("bert", False, 0)
    assert torch.equal(back.logits(batch)["prediction_logits"][..., :VOCAB], ours["prediction_logits"][..., :VOCAB])


@pytest.mark.slow
def test_a_trained_run_in_the_megatron_format_reads_in_transformers_converter(tmp_path, plugins):
    """`exp_manager.checkpoint.format = "megatron"`: the checkpoint a BERT training run
    writes is itself a Megatron-LM file transformers' converter reads, with mega's logits."""
    from mega.testing import TinyExperiment
    from tests.helpers.bert_files import write_documents as write_corpus  # documents of sentences, as BERT samples need

    corpus = write_corpus(tmp_path / "corpus.txt", num_docs=40)
    exp = TinyExperiment(tmp_path, corpus, plugins)
    run = exp.run(trainer={"max_steps": 2, "val_check_interval": 0},
                  exp_manager={"checkpoint": {"format": "megatron"}},
                  model={"name": "bert", "hidden_dropout": 0.0, "attention_dropout": 0.0, "ffn_hidden_size": 64,
                         "max_position_embeddings": 32, "micro_batch_size": 2,
                         "tokenizer": {"library": "wordpiece", "vocab_size": 120, "min_frequency": 1}})
    checkpoint = next((run.run_dir / "checkpoints").glob("iter_*"))
    sd = _load(checkpoint / "mp_rank_00" / "model_optim_rng.pt")
    assert sd["args"].tokenizer_type == "BertWordPieceLowerCase" and sd["iteration"] == 2
    hf = _converted(sd)
    model, tokenizer, _ = _mega_model(run.run_dir, plugins)
    batch = _batch("MegatronBertForPreTraining", vocab=tokenizer.vocab_size)
    diff = _max_diff(model.logits(batch), _hf_outputs(hf, batch), "MegatronBertForPreTraining", batch,
                     vocab=tokenizer.vocab_size)
    print(f"trained run, megatron format -> transformers' converter: max |d| {diff:.3g}")
    assert diff < 1e-5


@pytest.mark.parametrize("mlp, head, fusion, openai", [("gelu_tanh", "gelu", True, False),
                                                       ("gelu_tanh", "gelu_tanh", False, True)])
def test_the_activation_pair_travels_as_megatron_gelu_flags(tmp_path, plugins, vocab_file, capsys, mlp, head, fusion,
                                                           openai):
    """Megatron-LM's fused bias-GeLU (tanh in the MLP, exact in the LM head) and
    --openai-gelu (tanh in both) are mega's activation pairs; transformers has one
    hidden_act, so the export warns when the two differ."""
    from mega.cli import main

    run = _mega_run(tmp_path, plugins, vocab_file, activation=mlp, lm_head_activation=head)
    dest = _export_megatron(run, tmp_path / "meg")
    args = _load(dest / "iter_0000000" / "mp_rank_00" / "model_optim_rng.pt")["args"]
    assert (args.bias_gelu_fusion, args.openai_gelu) == (fusion, openai)
    assert main(["import", str(dest), str(tmp_path / "back")]) == 0
    back, _, config = _mega_model(tmp_path / "back", plugins)
    assert (config.model.activation, config.model.lm_head_activation) == (mlp, head)
    original, _, _ = _mega_model(run, plugins)
    batch = _batch("MegatronBertForPreTraining")
    assert _max_diff(back.logits(batch), original.logits(batch), "MegatronBertForPreTraining", batch) == 0.0
    capsys.readouterr()
    assert main(["export", str(run), str(tmp_path / "hf"), "--to", "hf"]) == 0  # the CLI logs to stderr
    assert ("transformers' MegatronBert has one hidden_act" in capsys.readouterr().err) == (mlp != head)
    assert transformers.MegatronBertConfig.from_pretrained(tmp_path / "hf").hidden_act == "gelu_new"
