"""T5 span corruption and BART infilling: the corrupted input plus the target always
reconstruct the original text, the noise follows its density and span length, samples
are shifted for teacher forcing; and `mega run` trains t5 and the seed's BART + MIM."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from mega.plugins.data.objectives import bart_infilling, encoder_decoder_sample, noise_spans, t5_span_corruption
from mega.config import config_from_dict
from mega.testing import read_metrics, tiny_raw

VOCAB, EOS = 1000, 3


@pytest.mark.parametrize("length,seed", [(2, 0), (7, 1), (50, 2), (128, 3)])
def test_t5_corruption_reconstructs_the_original(length, seed):
    ids = list(range(10, 10 + length))
    spans = noise_spans(length, 0.15, 3.0, np.random.default_rng(seed), max_spans=100)
    enc, target = t5_span_corruption(ids, spans, VOCAB, EOS)
    assert target[-1] == EOS
    hidden, current = {}, None
    for t in target[:-1]:
        if t >= VOCAB:
            current = t
            hidden[current] = []
        else:
            hidden[current].append(t)
    rebuilt = [x for t in enc for x in (hidden[t] if t >= VOCAB else [t])]
    assert rebuilt == ids
    noise = sum(b - a for a, b in spans)
    assert noise == min(max(1, round(length * 0.15)), length - 1)
    assert all(a > 0 for a, _ in spans[:1]) and all(b1 < a2 for (_, b1), (a2, _) in zip(spans, spans[1:]))


def test_span_count_follows_the_mean_length():
    spans = noise_spans(1000, 0.15, 3.0, np.random.default_rng(0), max_spans=100)
    assert len(spans) == 50 and sum(b - a for a, b in spans) == 150
    assert len(noise_spans(1000, 0.15, 3.0, np.random.default_rng(0), max_spans=10)) == 10  # capped by extra ids


def test_bart_infilling_masks_spans_and_targets_the_original():
    ids = list(range(10, 40))
    spans = noise_spans(len(ids), 0.3, 3.0, np.random.default_rng(4), max_spans=100)
    enc, target = bart_infilling(ids, spans, VOCAB, EOS)
    assert target == ids + [EOS]
    assert enc.count(VOCAB) == len(spans) and len(enc) == len(ids) - sum(b - a for a, b in spans) + len(spans)


def test_sample_is_shifted_for_teacher_forcing():
    s = encoder_decoder_sample([5, 6, 7], [8, 9, EOS], seq_length=5, seq_length_dec=4, pad_id=0, start_id=0)
    assert s["text_enc"].tolist() == [5, 6, 7, 0, 0] and s["enc_mask"].tolist() == [1, 1, 1, 0, 0]
    assert s["labels"].tolist() == [8, 9, EOS, 0] and s["text_dec"].tolist() == [0, 8, 9, 0]
    assert s["loss_mask"].tolist() == [1, 1, 1, 0]


def _enc_dec_config(tmp_path, corpus, plugins, name, overrides=(), **trainer):
    raw = tiny_raw(tmp_path, corpus, trainer=trainer)
    for gpt_key in ("num_layers", "hidden_size", "num_attention_heads", "hidden_dropout", "attention_dropout"):
        raw["model"].pop(gpt_key)
    raw["model"].update({"name": name, **copy.deepcopy(ENC_DEC)})  # overrides edit the raw dict in place
    return config_from_dict(raw, overrides, plugins)


ENC_DEC = {"seq_length": 32, "seq_length_dec": 16, "micro_batch_size": 4,
           "encoder": {"num_layers": 1, "hidden_size": 32, "num_attention_heads": 4},
           "decoder": {"num_layers": 1, "hidden_size": 32, "num_attention_heads": 4}}


@pytest.mark.slow
def test_mega_run_trains_t5(tmp_path, corpus, plugins):
    from mega.training.loop import train
    from mega.training.run import build_run

    cfg = _enc_dec_config(tmp_path, corpus, plugins, "t5")
    run = build_run(cfg, plugins)
    sample = run.train_data[0]
    assert sample["text_enc"].shape == (32,) and sample["labels"].shape == (16,)
    assert (sample["labels"] >= 258).any()  # sentinels past the byte vocabulary
    train(run)
    losses = [m["loss"] for m in read_metrics(run.run_dir) if "loss" in m]
    assert len(losses) == 6 and all(np.isfinite(losses))


def test_the_seeds_bart_mim_command_trains(tmp_path, corpus, plugins):
    from mega.training.loop import train
    from mega.training.run import build_run

    overrides = [
        "model.encoder.arch=perceiver", "model.encoder.hidden_steps=8",
        "model.data.data_impl=text_mmap", "model.data.whole_word_masking=False",
        "++model.hiddens.enc_output_name=z",
        "++model.hiddens.transform.q_z_given_x.cls_name=cond_gaussian",
        "++model.hiddens.transform.q_z_given_x.hidden_size=32",
        "++model.hiddens.loss.mim.cls_name=a_mim",
        "++model.hiddens.loss.mim.loss_weight=1.0",
    ]
    cfg = _enc_dec_config(tmp_path, corpus, plugins, "bart", overrides, max_steps=4)
    run = build_run(cfg, plugins)
    train(run)
    lines = read_metrics(run.run_dir)
    train_lines = [m for m in lines if "loss" in m]
    assert {"tokens_loss", "hiddens_mim_loss", "hiddens_mim_log_prob_P_z", "hiddens_loss"} <= set(train_lines[-1])
    assert "val_hiddens_mim_loss" in [m for m in lines if "val_loss" in m][-1]
    assert all(np.isfinite(m["loss"]) for m in train_lines)


@pytest.mark.slow
def test_cli_encodes_and_decodes_an_encoder_decoder_checkpoint(tmp_path, corpus, plugins, capsys):
    from mega.cli import main
    from mega.training.loop import train
    from mega.training.run import build_run

    cfg = _enc_dec_config(tmp_path, corpus, plugins, "bart",
                          ["++model.hiddens.enc_output_name=z", "++model.hiddens.transform.q.cls_name=cond_gaussian",
                           "++model.hiddens.transform.q.hidden_size=32", "++model.hiddens.loss.mim.cls_name=a_mim"],
                          max_steps=2, val_check_interval=0)
    run = build_run(cfg, plugins)
    train(run)
    out_file = tmp_path / "z.pt"
    assert main(["encode", str(run.run_dir), "--text", "the model reads", "--text", "a token", "--output", str(out_file)]) == 0
    tensors = torch.load(out_file)
    assert tensors["z_mean"].shape == (15, 2, 32) and torch.equal(tensors["z"], tensors["z_mean"])  # eval: z = z_mean
    assert tensors["hiddens_mask"][1].sum() == len("a token")
    capsys.readouterr()
    assert main(["generate", str(run.run_dir), "--prompt", "the model", "--max-new-tokens", "5"]) == 0
    assert len(capsys.readouterr().out) > 0


def test_whole_word_masking_hides_whole_words(tmp_path, corpus, plugins):
    from mega.training.run import build_run

    cfg = _enc_dec_config(tmp_path, corpus, plugins, "t5", ["model.data.whole_word_masking=true",
                                                             "model.data.masked_lm_prob=0.3"])
    run = build_run(cfg, plugins)
    for i in range(20):
        s = run.train_data[i]
        enc = s["text_enc"][s["enc_mask"].bool()].tolist()
        target = s["labels"][s["loss_mask"].bool()].tolist()
        for pos, t in enumerate(enc):
            if t >= 258:  # a sentinel: it must stand between whole words
                assert pos == 0 or enc[pos - 1] == 32, (i, pos)
        hidden_runs, cur = [], []
        for t in target[:-1]:
            if t >= 258:
                cur = []
                hidden_runs.append(cur)
            else:
                cur.append(t)
        assert all(run and run[0] != 32 for run in hidden_runs)  # each hidden span starts a word
