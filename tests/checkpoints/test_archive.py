"""Single-file archives (`mega export RUN model.mega --to archive`, mega.save_to /
mega.restore_from, `mega generate model.mega`) and NeMo 1.x `.nemo` import: the restored
model computes the same logits as the one saved, at another tensor-parallel size too;
damaged archives are refused by member."""
from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
import yaml

import mega
from mega.cli import main
from mega.errors import CheckpointError
from mega.checkpoint import restore
from mega.testing import TinyExperiment, write_corpus
from tests.helpers.nemo_gpt import nemo_yaml as _nemo_yaml, COLUMN as _COLUMN, ROW as _ROW, MCORE as _MCORE, nemo_shards as _nemo_shards, write_nemo as _write_nemo

ROOT = Path(__file__).resolve().parents[2]
TOKENS = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, plugins):
    """A tiny GPT trained 2 steps with a sentencepiece tokenizer (its file must travel)."""
    tmp = tmp_path_factory.mktemp("trained")
    exp = TinyExperiment(tmp, write_corpus(tmp / "corpus.txt"), plugins)
    run = exp.run(trainer={"max_steps": 2, "val_check_interval": 0},
                  model={"tokenizer": {"library": "sentencepiece", "vocab_size": 60}})
    archive = mega.save_to(run.run_dir, tmp / "model.mega", plugins)
    return run, archive


def _logits(model, vocab):
    with torch.no_grad():
        return model.eval()(TOKENS)[..., :vocab]


def test_archive_holds_one_checkpoint_and_restores_exactly(trained, plugins):
    run, archive = trained
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        manifest = json.loads(tar.extractfile("manifest.json").read())
    assert names[0] == "manifest.json"  # readable without scanning the weights
    assert set(names) == {"manifest.json", "config.toml", "tokenizer.tokenizer.model", "model_weights.ckpt", "sharding.json"}
    assert manifest["format"] == "archive" and manifest["archive_format_version"] == 1
    assert manifest["mega_version"] == mega.__version__ and manifest["step"] == 2
    assert (manifest["tensor_model_parallel_size"], manifest["pipeline_model_parallel_size"]) == (1, 1)
    assert set(manifest["files"]) == set(names) - {"manifest.json"}
    model, tokenizer, config = mega.restore_from(archive, plugins)
    assert config.model.tokenizer.library == "sentencepiece" and Path(config.model.tokenizer.model).is_file()
    assert torch.equal(_logits(model, tokenizer.vocab_size), _logits(run.model, tokenizer.vocab_size))


def test_generate_from_the_archive_prints_what_the_run_prints(trained, capsys):
    run, archive = trained
    args = ["--prompt", "the model", "--max-new-tokens", "8", "--greedy"]
    assert main(["generate", str(run.run_dir), *args]) == 0
    from_run = capsys.readouterr().out
    assert main(["generate", str(archive), *args]) == 0
    assert capsys.readouterr().out == from_run and from_run.startswith("the model")


def test_export_and_import_on_the_command_line(trained, tmp_path, capsys, plugins):
    run, _ = trained
    archive = tmp_path / "out" / "cli.mega"
    assert main(["export", str(run.run_dir), str(archive), "--to", "archive"]) == 0
    assert archive.is_file() and not list(archive.parent.glob(".*tmp*"))
    assert main(["export", str(run.run_dir), str(tmp_path / "out" / "short.mega")]) == 0  # the suffix says archive
    with tarfile.open(tmp_path / "out" / "short.mega") as tar:
        assert json.loads(tar.extractfile("manifest.json").read())["format"] == "archive"
    assert main(["import", str(archive), str(tmp_path / "imported")]) == 0
    assert "(archive)" in capsys.readouterr().out
    model, tokenizer, config = restore(tmp_path / "imported", plugins)
    assert config.exp_manager.name == "imported"
    assert torch.equal(_logits(model, tokenizer.vocab_size), _logits(run.model, tokenizer.vocab_size))


def test_any_checkpoint_format_exports_and_any_file_name_opens(tmp_path, plugins):
    """A Megatron-format run packs like a native one; an archive renamed .tar still opens."""
    exp = TinyExperiment(tmp_path, write_corpus(tmp_path / "corpus.txt"), plugins)
    run = exp.run(trainer={"max_steps": 1, "val_check_interval": 0}, exp_manager={"checkpoint": {"format": "megatron"}})
    archive = mega.save_to(run.run_dir, tmp_path / "megatron.tar", plugins)
    with tarfile.open(archive) as tar:
        assert json.loads(tar.extractfile("manifest.json").read())["source_format"] == "megatron"
    model, tokenizer, _ = mega.restore_from(archive, plugins)
    assert torch.equal(_logits(model, tokenizer.vocab_size), _logits(run.model, tokenizer.vocab_size))


def _rewrite(archive: Path, target: Path, change):
    """Copy `archive` to `target`, passing each (TarInfo, bytes) through `change`."""
    with tarfile.open(archive) as src, tarfile.open(target, "w") as dst:
        for m in src.getmembers():
            for info, data in change(m, src.extractfile(m).read()):
                info.size = len(data)
                dst.addfile(info, io.BytesIO(data))
    return target


def test_a_damaged_archive_is_refused_by_member(trained, tmp_path, plugins):
    _, archive = trained
    flipped = tmp_path / "flipped.mega"
    flipped.write_bytes(archive.read_bytes())
    with tarfile.open(flipped) as tar:
        at = tar.getmember("model_weights.ckpt").offset_data + 2000
    with flipped.open("r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(CheckpointError, match=r"flipped.mega: member model_weights.ckpt is corrupt"):
        mega.restore_from(flipped, plugins)

    dropped = _rewrite(archive, tmp_path / "dropped.mega", lambda m, d: [] if m.name == "sharding.json" else [(m, d)])
    with pytest.raises(CheckpointError, match=r"member sharding.json is missing"):
        mega.restore_from(dropped, plugins)

    def smuggle(m, d):
        yield m, d
        if m.name == "config.toml":
            yield tarfile.TarInfo("../evil.py"), b"print('hi')"

    with pytest.raises(CheckpointError, match=r"member \.\./evil.py: absolute, outside the archive"):
        mega.restore_from(_rewrite(archive, tmp_path / "evil.mega", smuggle), plugins)
    assert not (tmp_path / "evil.py").exists()

    def extra(m, d):
        yield m, d
        if m.name == "config.toml":
            yield tarfile.TarInfo("notes.txt"), b"hello"

    with pytest.raises(CheckpointError, match=r"member notes.txt is not listed in the archive's manifest"):
        mega.restore_from(_rewrite(archive, tmp_path / "extra.mega", extra), plugins)

    truncated = tmp_path / "truncated.mega"
    truncated.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"truncated.mega: member .* (cannot be read|is missing)"):
        mega.restore_from(truncated, plugins)


def _with_config(archive: Path, target: Path, change) -> Path:
    """Copy `archive` to `target` with config.toml passed through `change` (text -> text)
    and the manifest's entry for it updated: an archive that passes every member check."""
    import hashlib

    with tarfile.open(archive) as src:
        members = [(m, src.extractfile(m).read()) for m in src.getmembers()]
    data = dict((m.name, d) for m, d in members)
    config = change(data["config.toml"].decode()).encode()
    manifest = json.loads(data["manifest.json"])
    manifest["files"]["config.toml"] = {"size": len(config), "sha256": hashlib.sha256(config).hexdigest()}
    data["config.toml"], data["manifest.json"] = config, json.dumps(manifest).encode()
    with tarfile.open(target, "w") as dst:
        for m, _ in members:
            m.size = len(data[m.name])
            dst.addfile(m, io.BytesIO(data[m.name]))
    return target


@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink"])
def test_tokenizer_paths_outside_the_checkpoint_are_refused_naming_the_key(trained, tmp_path, capsys, plugins, how):
    """An archive whose config.toml names a file of this machine as its tokenizer (here a
    real sentencepiece model, so nothing else would fail) neither imports it into the run
    nor loads it."""
    run, archive = trained
    host = tmp_path / "host" / "secret.model"
    host.parent.mkdir()
    host.write_bytes((run.run_dir / "checkpoints" / "step_0000002" / "tokenizer.tokenizer.model").read_bytes())
    value = {"absolute": str(host), "dotdot": "../" * 40 + str(host).lstrip("/"), "symlink": "tokenizer.tokenizer.model"}[how]
    if how == "symlink":  # a checkpoint directory whose tokenizer file links outside it
        ckpt = tmp_path / "ckpt"
        mega.plugins.checkpoints.archive.unpack(archive, ckpt)
        (ckpt / value).unlink()
        (ckpt / value).symlink_to(host)
        with pytest.raises(CheckpointError, match=r"model.tokenizer.model='tokenizer.tokenizer.model' resolves outside"):
            restore(ckpt, plugins)
        return
    evil = _with_config(archive, tmp_path / "evil.mega",
                        lambda text: text.replace('model = "tokenizer.tokenizer.model"', f'model = "{value}"'))
    assert value in tarfile.open(evil).extractfile("config.toml").read().decode()
    assert main(["import", str(evil), str(tmp_path / "run")]) != 0
    assert f"model.tokenizer.model={value!r}" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    with pytest.raises(CheckpointError, match=r"model.tokenizer.model=.*relative paths inside it"):
        mega.restore_from(evil, plugins)
    # the checkpoint's own, relative file is what a legitimate config names
    from mega.checkpoint import checkpoint_tokenizer_files

    ckpt = run.run_dir / "checkpoints" / "step_0000002"
    assert checkpoint_tokenizer_files(ckpt, {"library": "sentencepiece", "model": "tokenizer.tokenizer.model"}) == {
        "model": ckpt / "tokenizer.tokenizer.model"}


def test_safe_members_refuses_what_unpacking_must_not_write(tmp_path, plugins):
    from mega.errors import ConfigError
    from mega.plugins.checkpoints.archive import safe_members

    def tar_of(*entries):
        path = tmp_path / f"t{len(list(tmp_path.iterdir()))}.tar"
        with tarfile.open(path, "w") as tar:
            for name, kind in entries:
                info = tarfile.TarInfo(name)
                if kind == "link":
                    info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                    tar.addfile(info)
                elif kind == "dir":
                    info.type = tarfile.DIRTYPE
                    tar.addfile(info)
                else:
                    info.size = 2
                    tar.addfile(info, io.BytesIO(b"ok"))
        return tarfile.open(path)

    with tar_of(("./a", "file"), ("d", "dir"), ("d/b", "file")) as tar:
        assert sorted(safe_members(tar)) == ["a", "d/b"]
    for entries, why in [([("x", "link")], "member x is not a plain file"),
                         ([("../x", "file")], r"member \.\./x: absolute, outside"),
                         ([("/x", "file")], "member /x: absolute, outside"),
                         ([("a/b", "file"), ("a//b", "file")], "member a/b: .* repeated"),
                         ([("a", "file"), ("./a", "file")], "member a: .* repeated")]:
        with tar_of(*entries) as tar, pytest.raises(CheckpointError, match=why):
            safe_members(tar, "some.tar")
    with pytest.raises(ConfigError, match="--option level: not an option of the archive format"):
        plugins.checkpoint_formats.get("archive").factory().import_run(tmp_path / "x.mega", tmp_path / "r",
                                                                       {"level": "9"}, plugins)


def test_a_failed_export_leaves_the_destination_as_it_was(trained, tmp_path, monkeypatch, plugins):
    run, _ = trained
    dest = tmp_path / "model.mega"
    dest.write_bytes(b"previous archive")

    def full_disk(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        mega.save_to(run.run_dir, dest, plugins)
    assert dest.read_bytes() == b"previous archive" and sorted(os.listdir(tmp_path)) == ["model.mega"]


def _mega(args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RANK", None)
    return subprocess.run([sys.executable, "-m", "mega", *args], capture_output=True, text=True, timeout=240, cwd=cwd, env=env)


@pytest.mark.slow
@pytest.mark.parametrize("layout,folders", [("model.tensor_model_parallel_size=2", ("mp_rank_00", "mp_rank_01")),
                                            ("model.pipeline_model_parallel_size=2", ("mp_rank_00_000", "mp_rank_00_001"))])
def test_a_model_parallel_run_restores_from_its_archive_in_one_process(tmp_path, plugins, layout, folders):
    exp = TinyExperiment(tmp_path, write_corpus(tmp_path / "corpus.txt"), plugins)
    toml = exp.toml(trainer={"max_steps": 2, "val_check_interval": 0},
                    model={"hidden_dropout": 0.0, "attention_dropout": 0.0})
    proc = _mega(["run", str(toml), "trainer.devices=2", layout, "trainer.accelerator=cpu"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    archive = mega.save_to(exp.run_dir(), tmp_path / "mp.mega", plugins)
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
    assert {f"{f}/{m}" for f in folders for m in ("model_weights.ckpt", "sharding.json")} <= names
    # the run's model: its two shards merged (by the kernel's resharding, tested elsewhere)
    reference, tokenizer, _ = restore(exp.run_dir(), plugins)
    model, _, _ = mega.restore_from(archive, plugins)
    # 258 byte ids pad to 272 at TP=2 and to 264 at TP=1: compare the real vocabulary
    torch.testing.assert_close(_logits(model, 258), _logits(reference, 258), rtol=0, atol=1e-5)


# --- NeMo 1.x .nemo ---------------------------------------------------------------------

NEMO_MODEL = {"num_layers": 2, "hidden_size": 32, "ffn_hidden_size": 64, "num_attention_heads": 4, "seq_length": 16,
              "make_vocab_size_divisible_by": 8, "activation": "gelu_tanh", "layernorm_epsilon": 1e-5}


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    """A tiny sentencepiece model (vocab 60), as a NeMo archive would carry it."""
    import sentencepiece as spm

    tmp = tmp_path_factory.mktemp("spm")
    spm.SentencePieceTrainer.train(input=str(write_corpus(tmp / "corpus.txt")), model_prefix=str(tmp / "tokenizer"),
                                   vocab_size=60, model_type="bpe", pad_id=0, unk_id=1, bos_id=2, eos_id=3)
    return tmp / "tokenizer.model"


@pytest.fixture(scope="module")
def source_gpt(spm_model, plugins):
    from mega.config import config_from_dict

    raw = {"model": {"name": "gpt", **NEMO_MODEL, "tokenizer": {"library": "sentencepiece", "model": str(spm_model)}}}
    mc = config_from_dict(raw, plugins=plugins).model
    tok = plugins.tokenizers.get("sentencepiece").factory(mc.tokenizer, [], None)
    torch.manual_seed(7)
    model = plugins.models.get("gpt").factory(mc, tok, plugins).eval()
    with torch.no_grad():  # LayerNorms away from their (1, 0) init, so a swapped name shows
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model, tok


# Written from NeMo's layouts (the spec's §2/§4 tables), independently of mega's importer.


@pytest.mark.parametrize("tp,mcore,mode", [(1, False, "w"), (2, False, "w:gz"), (2, True, "w")])
def test_a_nemo_archive_imports_with_equal_logits(source_gpt, spm_model, tmp_path, tp, mcore, mode, plugins):
    model, tok = source_gpt
    cfg = _nemo_yaml(tensor_model_parallel_size=tp, mcore_gpt=mcore)
    nemo = _write_nemo(tmp_path / "gpt.nemo", cfg, _nemo_shards(model, tp, mcore), spm_model, mode)
    assert main(["import", str(nemo), str(tmp_path / "run")]) == 0
    loaded, tokenizer, config = restore(tmp_path / "run", plugins)
    assert (config.model.activation, config.model.ffn_hidden_size, config.model.seq_length) == ("gelu_tanh", 64, 16)
    assert tokenizer.encode("the model") == tok.encode("the model")
    assert torch.equal(_logits(loaded, 60), _logits(model, 60))


def test_generate_reads_a_nemo_file_directly(source_gpt, spm_model, tmp_path, capsys, plugins):
    model, tok = source_gpt
    nemo = _write_nemo(tmp_path / "gpt.nemo", _nemo_yaml(), _nemo_shards(model, 1), spm_model)
    assert main(["generate", str(nemo), "--prompt", "the", "--max-new-tokens", "5", "--greedy"]) == 0
    from mega.inference import generate

    prompt = tok.encode("the")
    assert capsys.readouterr().out == tok.decode(prompt + generate(model, prompt, 5, greedy=True, eos_id=tok.eos_id)) + "\n"


# (rotary positions, SwiGLU, RMSNorm, bias-less layers and an untied output layer are the
# Llama family's architecture, which its converter reads: tests/test_llama_nemo.py)
@pytest.mark.parametrize("key,value,why", [
    ("position_embedding_type", "alibi", "learned absolute positions only"),
    ("activation", "approx-gelu", "x * sigmoid(1.702 x)"),
    ("normalization", "layernorm1p", "uses LayerNorm"),
    ("transformer_block_type", "post_ln", "pre-LayerNorm"),
])
def test_what_mega_cannot_run_is_refused_naming_the_yaml_key(source_gpt, spm_model, tmp_path, capsys, key, value, why):
    model, _ = source_gpt
    nemo = _write_nemo(tmp_path / "gpt.nemo", _nemo_yaml(**{key: value}), _nemo_shards(model, 1), spm_model)
    assert main(["import", str(nemo), str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"model_config.yaml: {key}={value!r}" in err and why in err
    assert not (tmp_path / "run").exists()


def test_nemo_weights_that_do_not_fit_are_named(source_gpt, spm_model, tmp_path, plugins):
    model, _ = source_gpt
    shards = _nemo_shards(model, 1)
    shards[0]["model.language_model.encoder.layers.0.mlp.gate.weight"] = torch.zeros(2)
    nemo = _write_nemo(tmp_path / "gpt.nemo", _nemo_yaml(), shards, spm_model)
    with pytest.raises(CheckpointError, match=r"no place for: model_weights.ckpt: model.language_model.encoder.layers.0.mlp.gate"):
        mega.restore_from(nemo, plugins)
    nemo = _write_nemo(tmp_path / "wide.nemo", _nemo_yaml(ffn_hidden_size=128), _nemo_shards(model, 1), spm_model)
    with pytest.raises(CheckpointError, match=r"dense_h_to_4h.weight has shape \[64, 32\], mega's gpt expects \[128, 32\]"):
        mega.restore_from(nemo, plugins)


def test_a_pipeline_parallel_nemo_archive_is_renumbered(source_gpt, spm_model, tmp_path, plugins):
    """tp_rank_00_pp_rank_00X/ files: layer indices local to each stage; the last stage
    carries NeMo's copy of the tied embedding (`model.word_embeddings.weight`)."""
    model, _ = source_gpt
    (full,) = _nemo_shards(model, 1)
    stages = [{}, {}]
    for name, t in full.items():
        if ".layers.1." in name:
            stages[1][name.replace(".layers.1.", ".layers.0.")] = t
        elif "final_layernorm" in name:
            stages[1][name] = t
        else:
            stages[0][name] = t
    stages[1]["model.word_embeddings.weight"] = full["model.language_model.embedding.word_embeddings.weight"]
    cfg = _nemo_yaml(pipeline_model_parallel_size=2)
    nemo = tmp_path / "pp.nemo"
    with tarfile.open(nemo, "w") as tar:
        members = {"model_config.yaml": yaml.safe_dump(cfg).encode(),
                   cfg["tokenizer"]["model"][len("nemo:"):]: spm_model.read_bytes()}
        for p, stage in enumerate(stages):
            buf = io.BytesIO()
            torch.save(stage, buf)
            members[f"tp_rank_00_pp_rank_{p:03d}/model_weights.ckpt"] = buf.getvalue()
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    loaded, _, _ = mega.restore_from(nemo, plugins)
    assert torch.equal(_logits(loaded, 60), _logits(model, 60))


@pytest.mark.parametrize("changes, expected", [
    ({"activation": "gelu"}, "gelu_tanh"),  # NeMo's default bias_activation_fusion: fused bias-GELU, tanh
    ({"activation": "gelu", "bias_activation_fusion": True}, "gelu_tanh"),
    ({"activation": "gelu", "bias_activation_fusion": False}, "gelu"),  # F.gelu: exact
    ({"activation": "gelu", "bias_activation_fusion": False, "openai_gelu": True}, "gelu_tanh"),
    ({"activation": "fast-gelu", "bias_activation_fusion": False}, "gelu_tanh"),
])
def test_nemo_activation_follows_nemos_gelu_semantics(changes, expected):
    from mega.plugins.models.gpt_interop.nemo import model_config

    assert model_config(_nemo_yaml(**changes))["activation"] == expected


def test_a_nemo_gpt2_bpe_tokenizer_is_carried_over(tmp_path, plugins):
    """NeMo's GPT2BPETokenizer (library megatron): vocab_file / merge_file are `nemo:` members."""
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(write_corpus(tmp_path / "corpus.txt", lines=60).read_text().splitlines(), vocab_size=300,
                            min_frequency=2, special_tokens=["<|endoftext|>"], show_progress=False)
    (tmp_path / "bpe").mkdir()
    tok.save_model(str(tmp_path / "bpe"))
    raw = {"model": {"name": "gpt", **NEMO_MODEL, "tokenizer": {"library": "huggingface",
                     "vocab_file": str(tmp_path / "bpe" / "vocab.json"), "merges_file": str(tmp_path / "bpe" / "merges.txt")}}}
    from mega.config import config_from_dict

    mc = config_from_dict(raw, plugins=plugins).model
    hf_tok = plugins.tokenizers.get("huggingface").factory(mc.tokenizer, [], None)
    torch.manual_seed(2)
    model = plugins.models.get("gpt").factory(mc, hf_tok, plugins).eval()
    state = {"model." + k: v.clone() for k, v in model.state_dict().items()}
    cfg = _nemo_yaml(tokenizer={"library": "megatron", "type": "GPT2BPETokenizer", "model": None,
                                "vocab_file": "nemo:aa_vocab.json", "merge_file": "nemo:bb_merges.txt"})
    nemo = tmp_path / "bpe.nemo"
    with tarfile.open(nemo, "w") as tar:
        buf = io.BytesIO()
        torch.save(state, buf)
        for name, data in {"model_config.yaml": yaml.safe_dump(cfg).encode(), "model_weights.ckpt": buf.getvalue(),
                           "aa_vocab.json": (tmp_path / "bpe" / "vocab.json").read_bytes(),
                           "bb_merges.txt": (tmp_path / "bpe" / "merges.txt").read_bytes()}.items():
            info = tarfile.TarInfo("./" + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert main(["import", str(nemo), str(tmp_path / "run")]) == 0
    loaded, tokenizer, config = restore(tmp_path / "run", plugins)
    assert config.model.tokenizer.library == "huggingface"
    assert tokenizer.encode("the model") == hf_tok.encode("the model")
    assert torch.equal(_logits(loaded, hf_tok.vocab_size), _logits(model, hf_tok.vocab_size))


def test_nemo_options_are_checked(source_gpt, spm_model, tmp_path, capsys):
    model, _ = source_gpt
    nemo = _write_nemo(tmp_path / "gpt.nemo", _nemo_yaml(), _nemo_shards(model, 1), spm_model)
    assert main(["import", str(nemo), str(tmp_path / "run"), "--option", "tokenizer.vocab=x"]) == 2
    assert "--option tokenizer.vocab: not an option of the nemo format" in capsys.readouterr().err


@pytest.mark.parametrize("tp", [1, 2])
def test_a_gpt_run_exports_as_nemos_megatron_gpt_model_and_back(trained, tmp_path, plugins, tp):
    """mega export --to nemo: NeMo 1.23's MegatronGPTModel layout (plain tar of `./` members,
    one mp_rank_XX per rank, `model.`-prefixed legacy names, the tokenizer as a `nemo:` member),
    and importing it gives the run's logits; the same export twice is the same file."""
    run, _ = trained
    out = tmp_path / "gpt.nemo"
    options = [] if tp == 1 else ["--option", "tensor_parallel=2"]
    assert main(["export", str(run.run_dir), str(out), "--to", "nemo", *options]) == 0
    with tarfile.open(out, "r:") as tar:
        names = tar.getnames()
        cfg = yaml.safe_load(tar.extractfile("./model_config.yaml").read())
        first = f"./{'mp_rank_00/' if tp > 1 else ''}model_weights.ckpt"
        shard = torch.load(io.BytesIO(tar.extractfile(first).read()), weights_only=True)
    assert names[0] == "." and all(n.startswith("./") for n in names[1:])
    assert cfg["target"].endswith("megatron_gpt_model.MegatronGPTModel") and cfg["mcore_gpt"] is False
    assert cfg["tensor_model_parallel_size"] == tp and cfg["tokenizer"]["library"] == "sentencepiece"
    assert f"./{cfg['tokenizer']['model'][len('nemo:'):]}" in names and cfg["tokenizer"]["model"].endswith("_tokenizer.model")
    mc = run.config.model
    assert cfg["bias_activation_fusion"] is (mc.activation == "gelu_tanh") and cfg["openai_gelu"] is False
    qkv = shard["model.language_model.encoder.layers.0.self_attention.query_key_value.weight"]
    assert list(qkv.shape) == [3 * mc.hidden_size // tp, mc.hidden_size]
    assert main(["import", str(out), str(tmp_path / "back")]) == 0
    model, tokenizer, _ = restore(tmp_path / "back", plugins)
    assert torch.equal(_logits(model, tokenizer.vocab_size), _logits(run.model, tokenizer.vocab_size))
    again = tmp_path / "again.nemo"
    assert main(["export", str(run.run_dir), str(again), "--to", "nemo", *options]) == 0
    assert again.read_bytes() == out.read_bytes()


def test_nemo_export_options_are_checked(trained, tmp_path, capsys):
    run, _ = trained
    assert main(["export", str(run.run_dir), str(tmp_path / "x.nemo"), "--to", "nemo", "--option", "tp=2"]) == 2
    assert "--option tp: not an option of the nemo format" in capsys.readouterr().err
    assert main(["export", str(run.run_dir), str(tmp_path / "x.nemo"), "--to", "nemo", "--option", "tensor_parallel=3"]) == 2
    assert "not divisible by --option tensor_parallel=3" in capsys.readouterr().err
    assert not (tmp_path / "x.nemo").exists()
