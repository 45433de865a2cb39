"""Megatron-BERT under the parallel runtime (gloo, CPU): tensor parallelism (the
vocabulary-parallel LM head and its tied decoder), pipeline parallelism (embedding on the
first stage; final LayerNorm, pooler and heads on the last, the tied word embedding's copy
there) and data parallelism each train like one process through the real training loop:
the same per-step loss, lm_loss, sop_loss and clipped gradient norm.

The samples come from a test-local data source of synthetic BertObjective samples (padding,
two segments, masked positions, `is_random`), a pure function of (split, index, seed)."""
from __future__ import annotations

import pytest
import torch
from attrs import define

import mega
from mega.config import DataConfig
from mega.testing import run_ranks


@define(kw_only=True)
class SyntheticBertData(DataConfig):
    data_impl: str = "bert_synthetic"


class SyntheticBertSamples:
    def __init__(self, split: str, vocab: int, seq_length: int, num_samples: int, seed: int):
        self.split, self.vocab, self.s, self.n, self.seed = split, vocab, seq_length, num_samples, seed

    def __len__(self):
        return self.n

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + i) * 3 + ("train", "valid", "test").index(self.split))
        s = self.s
        length = int(torch.randint(s // 2, s + 1, (), generator=g))
        real = torch.arange(s) < length
        tokens = torch.randint(0, self.vocab, (s,), generator=g).masked_fill(~real, 0)
        types = (torch.arange(s) >= length // 2).long() * real
        loss_mask = (torch.rand(s, generator=g) < 0.2) & real
        loss_mask[1] = True
        labels = torch.where(loss_mask, torch.randint(0, self.vocab, (s,), generator=g), -1)
        return {"tokens": tokens, "tokentype_ids": types, "padding_mask": real.long(), "labels": labels,
                "loss_mask": loss_mask.long(), "is_random": torch.randint(0, 2, (), generator=g), "truncated": torch.tensor(0)}


class SyntheticBertSource:
    def __init__(self, corpus):
        self.corpus = corpus

    def files(self):
        return [self.corpus]

    def dataset(self, split, tokenizer, seq_length, num_samples, seed, objective=None):
        assert objective.name == "bert", objective
        return SyntheticBertSamples(split, tokenizer.vocab_size, seq_length, num_samples, seed)


class SyntheticBertPlugin:
    @mega.hookimpl
    def register_datasets(self, register):
        register("bert_synthetic", lambda config, run_dir: SyntheticBertSource(config.data_prefix[0]),
                 config=SyntheticBertData)


def _bert_train(state, micro, steps, d):
    """Train `steps` steps of a tiny BERT through the real loop at this layout; per step
    (loss, lm_loss, sop_loss, grad_norm)."""
    from mega.config import config_from_dict
    from mega.testing import register_plugin, write_corpus
    from mega.training.loop import train_step
    from mega.training.run import build_run

    d = d / f"w{state.world_size}t{state.tp_size}p{state.pp_size}"
    corpus = d / "c.txt"
    if state.rank == 0:
        d.mkdir()
        write_corpus(corpus, lines=20)
    state.barrier()
    with register_plugin(SyntheticBertPlugin()) as plugins:
        cfg = config_from_dict({
            "trainer": {"devices": state.world_size, "accelerator": "cpu", "max_steps": steps, "val_check_interval": 0,
                        "gradient_clip_val": 0.5},
            "exp_manager": {"exp_dir": str(d), "loggers": []},
            "model": {"name": "bert", "num_layers": 4, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 16,
                      "max_position_embeddings": 16,
                      # 258 byte ids pad to 260 at TP=1 and TP=2 alike: every layout draws the same initial weights
                      "micro_batch_size": 8 // micro, "global_batch_size": 8, "make_vocab_size_divisible_by": 130,
                      "hidden_dropout": 0.0, "attention_dropout": 0.0,
                      "tensor_model_parallel_size": state.tp_size, "pipeline_model_parallel_size": state.pp_size,
                      "tokenizer": {"library": "bytes"},
                      "data": {"data_impl": "bert_synthetic", "data_prefix": [str(corpus)]}},
        }, plugins=plugins)
        run = build_run(cfg, plugins)
        out = []
        for _ in range(steps):
            m = train_step(run)
            run.step += 1
            out.append(tuple(float(m[k]) for k in ("loss", "lm_loss", "sop_loss", "grad_norm")))
        return out


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    ref = run_ranks(_bert_train, world=1, args=(2, 3, tmp_path_factory.mktemp("bert1")))[0]
    assert ref[0][0] == pytest.approx(ref[0][1] + ref[0][2], rel=1e-6)  # loss = lm_loss + sop_loss
    return ref


@pytest.mark.slow
@pytest.mark.parametrize("world,tp,pp", [(2, 2, 1), (2, 1, 2), (2, 1, 1)], ids=["tp2", "pp2", "dp2"])
def test_bert_trains_like_one_process(one_process, tmp_path, world, tp, pp):
    """TP=2, PP=2 (two micro-batches through 1F1B) and DP=2 against one process."""
    for rank, steps in enumerate(run_ranks(_bert_train, world=world, tp=tp, pp=pp, args=(2, 3, tmp_path), timeout=240)):
        for s, (a, b) in enumerate(zip(one_process, steps)):
            assert b == pytest.approx(a, rel=1e-5), (rank, s)
