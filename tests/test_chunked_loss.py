"""The output layer + cross entropy a chunk of tokens at a time
(`model.loss_chunk_size`) against the unchunked loss: the same loss sum and gradients in
fp32 (1e-6), close under bf16 autocast, and under tensor parallelism 2 (gloo) the same as
one unchunked process."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mega.runtime.tensor_parallel import chunked_linear_cross_entropy, vocab_parallel_cross_entropy
from mega.testing import full_grads, run_ranks


def _data(n_tokens=37, hidden=24, vocab=80, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n_tokens, hidden, generator=g)
    w = torch.randn(vocab, hidden, generator=g) * 0.3
    target = torch.randint(0, 70, (n_tokens,), generator=g)
    mask = (torch.rand(n_tokens, generator=g) > 0.2).float()
    return h, w, target, mask


def _unchunked(h, w, target, mask, vocab_size):
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = (vocab_parallel_cross_entropy(F.linear(h, w), target, vocab_size) * mask).sum()
    loss.backward()
    return loss.detach(), h.grad, w.grad


def _chunked(h, w, target, mask, vocab_size, chunk):
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = chunked_linear_cross_entropy(h, w, target, mask, vocab_size, chunk)
    (loss * 0.5).backward()  # the incoming gradient scales both
    return loss.detach(), h.grad * 2, w.grad * 2


@pytest.mark.parametrize("vocab_size", [None, 70])  # all 80 ids in the softmax / ids >= 70 are padding
@pytest.mark.parametrize("chunk", [1, 8, 37, 1000])
def test_chunked_equals_unchunked_in_fp32(vocab_size, chunk):
    h, w, target, mask = _data()
    ref = _unchunked(h, w, target, mask, vocab_size)
    got = _chunked(h, w, target, mask, vocab_size, chunk)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_chunked_equals_the_formula_in_float64():
    """Against -log_softmax written out in float64 (the reference both paths approximate)."""
    h, w, target, mask = _data()
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    ref = -(F.linear(h64, w64)[:, :70].log_softmax(-1).gather(-1, target[:, None]).squeeze(-1) * mask.double()).sum()
    ref.backward()
    loss, gh, gw = _chunked(h, w, target, mask, 70, 16)
    assert float(loss) == pytest.approx(float(ref.detach()), rel=1e-6)
    torch.testing.assert_close(gh.double(), h64.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw.double(), w64.grad, rtol=1e-5, atol=1e-6)


def test_chunked_under_bf16_autocast_matches_autocast_unchunked():
    """The products run in bf16 like F.linear under autocast; the softmax in fp32. The weight
    gradient is summed over chunks in fp32 (one bf16 product unchunked), hence 1e-2."""
    h, w, target, mask = _data(n_tokens=64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _unchunked(h, w, target, mask, 70)
        got = _chunked(h, w, target, mask, 70, 16)
    assert float(got[0]) == pytest.approx(float(ref[0]), rel=1e-5)
    for a, b in zip(got[1:], ref[1:]):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)


def test_no_gradient_work_without_grad():
    h, w, target, mask = _data()
    with torch.no_grad():
        loss = chunked_linear_cross_entropy(h, w, target, mask, 70, 8)
    assert float(loss) == pytest.approx(float(_unchunked(h, w, target, mask, 70)[0]), rel=1e-6)


def _gpt(chunk: int, vocab: int = 50):
    from mega.config import config_from_dict
    from mega.plugins.models.gpt import GPTModel

    cfg = config_from_dict({"model": {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 16,
                                      "make_vocab_size_divisible_by": 16, "hidden_dropout": 0.0,
                                      "attention_dropout": 0.0, "loss_chunk_size": chunk}}).model
    torch.manual_seed(0)
    return GPTModel(cfg, vocab)


def _gpt_loss_and_grads(state, chunk: int):
    """Loss sum and the full (gathered) gradients of a GPT on fixed data at this layout."""
    model = _gpt(chunk)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 50, (2, 16), generator=g)
    labels = torch.randint(0, 50, (2, 16), generator=g)
    mask = (torch.rand(2, 16, generator=g) > 0.25).float()
    out = model.training_loss({"tokens": tokens, "labels": labels, "loss_mask": mask})
    out["loss_sum"].backward()
    grads = full_grads(model, state)
    return out["loss_sum"].item(), grads


def test_gpt_chunked_loss_equals_unchunked():
    from mega.runtime.parallel import current

    ref_loss, ref_grads = _gpt_loss_and_grads(current(), 0)
    loss, grads = _gpt_loss_and_grads(current(), 5)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.slow
def test_gpt_tp2_chunked_equals_tp1_unchunked():
    ref_loss, ref_grads = run_ranks(_gpt_loss_and_grads, world=1, args=(0,))[0]
    for loss, grads in run_ranks(_gpt_loss_and_grads, world=2, tp=2, args=(7,)):
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        for k in ref_grads:
            torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-5, msg=k)


def test_loss_chunk_size_must_not_be_negative():
    from mega.config import config_from_dict
    from mega.errors import ConfigError

    with pytest.raises(ConfigError, match="model.loss_chunk_size"):
        config_from_dict({"model": {"loss_chunk_size": -1}}).model.check()


def test_mega_plan_counts_one_chunk_of_logits_not_all():
    """The memory estimate (mega plan) of the last stage: unchunked it holds the fp32 softmax
    of every token, chunked only one chunk's logits and the two gradients made in forward."""
    from mega.config import config_from_dict

    def stage(chunk):
        cfg = config_from_dict({"model": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                                          "seq_length": 1024, "loss_chunk_size": chunk}}).model
        return cfg.memory_per_rank(50257, 8, 1, 1, "bf16", "cuda")["stages"][0]

    whole, chunked = stage(0), stage(1024)
    logits = 8 * 1024 * 50304
    assert whole["transient"] >= 6 * logits and whole["activations"] >= 4 * logits
    assert chunked["transient"] == 10 * 1024 * 50304 and chunked["activations"] < whole["activations"] - 3 * logits
