"""The encoder-decoder model: loss equals the formula, padding never leaks into real
positions, the Perceiver gives fixed-length hiddens, the hiddens joint loss equals
specs/hiddens.md §3.3, the seed's override lines configure it, and TP=2 equals TP=1."""
from __future__ import annotations

import pytest
import torch

from mega.config import config_from_dict
from mega.plugins.models.encoder_decoder import EncoderDecoderModel
from mega.testing import run_ranks

V, B, SE, SD = 40, 3, 10, 6


def _cfg(plugins=None, overrides=(), **model):
    stack = {"num_layers": 2, "hidden_size": 16, "num_attention_heads": 4, "hidden_dropout": 0.0, "attention_dropout": 0.0}
    raw = {"model": {"name": "bart", "seq_length": SE, "seq_length_dec": SD, "make_vocab_size_divisible_by": 8,
                     "encoder": dict(stack), "decoder": dict(stack), **model}}
    return config_from_dict(raw, overrides, plugins).model


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    enc_mask = torch.ones(B, SE, dtype=torch.long)
    enc_mask[1, 6:] = 0
    loss_mask = torch.ones(B, SD)
    loss_mask[2, 4:] = 0
    return {"text_enc": torch.randint(1, V, (B, SE), generator=g), "enc_mask": enc_mask,
            "text_dec": torch.randint(1, V, (B, SD), generator=g), "labels": torch.randint(1, V, (B, SD), generator=g),
            "loss_mask": loss_mask}


def _model(cfg, seed=0):
    torch.manual_seed(seed)
    return EncoderDecoderModel(cfg, V).double().eval()


def _double(batch):
    return {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}


@pytest.mark.parametrize("mask_padded_vocab", [True, False])
def test_loss_equals_cross_entropy_formula(plugins, mask_padded_vocab):
    """The softmax runs over the 40 tokenizer ids and the 100 extra ids; the 4 padded ids
    (140 -> 144) are left out, or counted with model.mask_padded_vocab = false (Megatron-LM)."""
    model, batch = _model(_cfg(plugins, mask_padded_vocab=mask_padded_vocab)), _double(_batch())
    enc = model.encode(batch["text_enc"], batch["enc_mask"])
    logits = model.decode(batch["text_dec"], enc["enc_output"].transpose(0, 1), enc["hiddens_mask"])
    assert logits.shape[-1] == 144
    if mask_padded_vocab:
        logits = logits[..., :V + 100]
    ref = -(logits.log_softmax(-1).gather(-1, batch["labels"][..., None])[..., 0] * batch["loss_mask"]).sum()
    torch.testing.assert_close(model.training_loss(batch)["loss_sum"], ref)


def test_padding_does_not_leak(plugins):
    model, batch = _model(_cfg(plugins)), _double(_batch())
    other = dict(batch)
    other["text_enc"] = batch["text_enc"].clone()
    other["text_enc"][1, 6:] = 7  # change only padded encoder positions
    torch.testing.assert_close(model.training_loss(other)["loss_sum"], model.training_loss(batch)["loss_sum"])


def test_perceiver_hiddens_have_a_fixed_length(plugins):
    model = _model(_cfg(plugins, ["model.encoder.arch=perceiver", "model.encoder.hidden_steps=7"]))
    for s in (4, 10):
        enc = model.encode(torch.randint(1, V, (2, s)), torch.ones(2, s, dtype=torch.long))
        assert enc["hiddens"].shape == (7, 2, 16) and enc["hiddens_mask"].shape == (2, 7)


SEED_HIDDENS = [
    "++model.hiddens.enc_output_name=z",
    "++model.hiddens.transform.q_z_given_x.cls_name=cond_gaussian",
    "++model.hiddens.transform.q_z_given_x.hidden_size=16",
    "++model.hiddens.loss.mim.cls_name=a_mim",
    "++model.hiddens.loss.mim.loss_weight=1.0",
]


def test_seed_hiddens_overrides_and_joint_loss(plugins):
    cfg = _cfg(plugins, ["model.encoder.arch=perceiver", *SEED_HIDDENS])
    q = cfg.hiddens.transform["q_z_given_x"]
    assert (q.cls_name, q.hidden_size, q.min_logvar) == ("cond_gaussian", 16, -6.0)
    model, batch = _model(cfg), _double(_batch())
    out = model.training_loss(batch)
    n = batch["loss_mask"].sum()
    enc = model.encode(batch["text_enc"], batch["enc_mask"])  # eval: z = z_mean, deterministic
    d = model.hiddens_module.apply_loss_transforms(enc)
    logits = model.decode(batch["text_dec"], enc["z"].transpose(0, 1), enc["hiddens_mask"])[..., :V + 100]
    tokens_mean = -(logits.log_softmax(-1).gather(-1, batch["labels"][..., None])[..., 0] * batch["loss_mask"]).sum() / n
    torch.testing.assert_close(out["loss_sum"] / n, d["hiddens_loss"] + 1.0 * tokens_mean)
    assert {"tokens_loss", "hiddens_mim_loss", "hiddens_loss"} <= set(out["terms"])
    out["loss_sum"].backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert model.hiddens_module.hidden_transforms[0].hiddens_to_mean_logvar.weight.grad.abs().sum() > 0


def test_bad_hiddens_config_names_the_table(plugins):
    from mega.errors import ConfigError

    with pytest.raises(ConfigError, match="model.hiddens.loss.m.cls_name: unknown hidden loss 'amim', did you mean a_mim"):
        _cfg(plugins, ["++model.hiddens.loss.m.cls_name=amim"])  # a config error, before any model is built
    with pytest.raises(ConfigError, match=r"model.hiddens: Loss transforms inputs = \{.*'z.*\} are not supported"):
        _model(_cfg(plugins, ["++model.hiddens.loss.m.cls_name=a_mim"]))
    with pytest.raises(ConfigError, match="model.encoder.hidden_size=16 and model.decoder.hidden_size=32 must be equal"):
        _model(_cfg(plugins, ["model.decoder.hidden_size=32"]))


def _argmax_reference(model, text_enc, enc_mask, bos_id, steps):
    """Decode by hand: encode, take the memory training decodes from (the hiddens output
    `z`), run the whole prefix through `decode` each step and append the argmax over the
    tokenizer's vocabulary (never a sentinel or padding id). No early stop."""
    enc = model.encode(text_enc, enc_mask)
    memory = enc["z"].transpose(0, 1)
    out = torch.full((text_enc.shape[0], 1), bos_id, dtype=torch.long)
    for _ in range(steps):
        logits = model.decode(out, memory, enc["hiddens_mask"])
        out = torch.cat([out, logits[:, -1, :V].argmax(-1, keepdim=True)], dim=1)
    return out


def test_greedy_decode_equals_an_argmax_by_argmax_reference(plugins):
    model = _model(_cfg(plugins, SEED_HIDDENS))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # freshly initialised, the tied embedding just repeats bos: perturb the matrices
        for p in model.parameters():
            if p.dim() >= 2:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    text_enc = torch.randint(3, V, (3, SE), generator=g)
    enc_mask = torch.ones(3, SE, dtype=torch.long)
    enc_mask[1, 7:] = 0
    with torch.no_grad():
        ref = _argmax_reference(model, text_enc, enc_mask, bos_id=1, steps=7)
        # a reference of one repeated token, or rows blind to their input, would prove little
        assert len(set(ref[:, 1:].flatten().tolist())) > 3 and not torch.equal(ref[0], ref[1])

        never = next(t for t in range(3, V) if not (ref == t).any())
        assert torch.equal(model.greedy_decode(text_enc, enc_mask, bos_id=1, eos_id=never, max_len=8), ref)

        # with an eos every row emits, decoding stops after the first step at which each
        # row has produced one; until then it is the reference
        eos = next(t for t in range(3, V) if (ref[:, 1:] == t).any(dim=1).all())
        seen = ((ref[:, 1:] == eos).cumsum(1) > 0).all(0)  # [steps]: every row has emitted eos
        stop = int(seen.int().argmax()) + 1
        assert stop < 7  # the early stop is really exercised
        out = model.greedy_decode(text_enc, enc_mask, bos_id=1, eos_id=eos, max_len=8)
    assert torch.equal(out, ref[:, : stop + 1])


def _encdec_tp(state):
    import torch.distributed as dist

    # 40 ids + 100 extra ids pad to 140 at TP=1 and TP=2 alike with this multiple, so both
    # layouts draw the same initial weights (the embedding is initialised at its padded size)
    cfg = _cfg(None, ["model.encoder.arch=perceiver", "model.make_vocab_size_divisible_by=70", *SEED_HIDDENS],
               tensor_model_parallel_size=state.tp_size)
    torch.manual_seed(0)
    model = EncoderDecoderModel(cfg, V).eval()
    batch = _batch()
    enc = model.encode(batch["text_enc"], batch["enc_mask"])
    logits = model.decode(batch["text_dec"], enc["enc_output"].transpose(0, 1), enc["hiddens_mask"])
    out = model.training_loss(batch)
    out["loss_sum"].backward()
    grad = model.embedding.word_embeddings.weight.grad
    if state.tp_size > 1:
        parts = [torch.empty_like(grad) for _ in range(state.tp_size)]
        dist.all_gather(parts, grad.contiguous(), group=state.tp_group)
        grad = torch.cat(parts)
    return logits.detach(), out["loss_sum"].item(), grad


@pytest.mark.slow
def test_encoder_decoder_tp2_equals_tp1():
    ref_logits, ref_loss, ref_grad = run_ranks(_encdec_tp, world=1)[0]
    for logits, loss, grad in run_ranks(_encdec_tp, world=2, tp=2):
        torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)


def test_generate_with_a_prompt_longer_than_the_encoder_warns_and_cuts_it(tmp_path, plugins, capsys):
    from mega.cli import main
    from mega.checkpoint import write_imported_run

    mc = _cfg(plugins, tokenizer={"library": "bytes"})
    tok = plugins.tokenizers.get("bytes").factory(mc.tokenizer, [], None)
    model = plugins.models.get("bart").factory(mc, tok, plugins)
    raw = {"model": {"name": "bart", "seq_length": SE, "seq_length_dec": SD, "make_vocab_size_divisible_by": 8,
                     "encoder": {k: getattr(mc.encoder, k) for k in ("num_layers", "hidden_size", "num_attention_heads")},
                     "decoder": {k: getattr(mc.decoder, k) for k in ("num_layers", "hidden_size", "num_attention_heads")},
                     "tokenizer": {"library": "bytes"}}}
    write_imported_run(tmp_path / "bart", raw, model.state_dict(), plugins)
    assert main(["generate", str(tmp_path / "bart"), "--prompt", "x" * (SE + 40), "--max-new-tokens", "500"]) == 0
    assert f"the encoder reads the first {SE} (model.seq_length)" in capsys.readouterr().err
