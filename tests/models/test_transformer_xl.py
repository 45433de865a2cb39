"""Transformer-XL: every formula against a direct (float64) transcription of it — the
relative scores behind the rel-shift, the masks, memory against recomputing the whole
context, the adaptive softmax against dense softmaxes — the reference's parameter counts,
state-dict names and initialisation statistics, and the whole model against Hugging
Face's port of the original code (transformers' deprecated TransfoXL)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mega.plugins.models.adaptive_softmax import AdaptiveEmbedding, ProjectedAdaptiveLogSoftmax
from mega.plugins.models.transformer_xl import (
    RelPartialLearnableMultiHeadAttn,
    TransformerXLConfig,
    TransformerXLModel,
    attn_mask,
    rel_shift,
    update_mems,
)


def tiny(**kw) -> TransformerXLConfig:
    base = dict(n_layer=2, d_model=16, n_head=2, d_head=8, d_inner=32, dropout=0.0, dropatt=0.0, tgt_len=6, mem_len=6,
                cutoffs=[20, 50, 80], div_val=1, global_batch_size=2, micro_batch_size=2)
    base.update(kw)
    return TransformerXLConfig(**base)


def model_of(cfg, vocab=100, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return TransformerXLModel(cfg, vocab).to(dtype).eval()


# --- rel-shift, masks -------------------------------------------------------------------------------


def test_rel_shift_puts_the_score_of_distance_mlen_plus_i_minus_j_at_every_unmasked_pair():
    qlen, mlen = 4, 3
    klen = qlen + mlen
    x = torch.randn(2, 3, qlen, klen, dtype=torch.float64)  # column c: distance klen - 1 - c
    y = rel_shift(x)
    for i in range(qlen):
        for j in range(mlen + i + 1):
            assert torch.equal(y[..., i, j], x[..., i, klen - 1 - (mlen + i - j)])
    assert torch.equal(y[..., 0, :qlen], x[..., 0, mlen:])  # the reference's worked example: row 0 = raw columns 3..6
    assert torch.equal(y[..., qlen - 1, :], x[..., qlen - 1, :])


@pytest.mark.parametrize("clamp_len", [-1, 3])
def test_attention_equals_the_papers_four_terms_computed_directly(clamp_len):
    torch.manual_seed(0)
    n_head, d_head, d_model, qlen, mlen, bsz = 2, 4, 8, 5, 3, 2
    attn = RelPartialLearnableMultiHeadAttn(n_head, d_model, d_head, 0.0, 0.0, pre_lnorm=False).double()
    w = torch.randn(qlen, bsz, d_model, dtype=torch.float64)
    mems = torch.randn(mlen, bsz, d_model, dtype=torch.float64)
    u, v = torch.randn(n_head, d_head, dtype=torch.float64), torch.randn(n_head, d_head, dtype=torch.float64)
    klen = qlen + mlen
    pos_seq = torch.arange(klen - 1, -1, -1.0, dtype=torch.float64)
    if clamp_len > 0:
        pos_seq = pos_seq.clamp(max=clamp_len)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)

    def sinusoid(dist):  # R_dist: all sines, then all cosines
        d = float(min(dist, clamp_len) if clamp_len > 0 else dist)
        return torch.cat([torch.sin(d * inv_freq), torch.cos(d * inv_freq)])

    r = torch.stack([sinusoid(klen - 1 - c) for c in range(klen)])[:, None, :]
    mask = attn_mask(qlen, mlen, mlen, False, w.device)
    out = attn(w, r, u, v, mask, mems)

    cat = torch.cat([mems, w])
    wq, wk, wv = attn.qkv_net.weight.view(3, n_head, d_head, d_model)
    wr = attn.r_net.weight.view(n_head, d_head, d_model)
    expected = torch.zeros(qlen, bsz, n_head, d_head, dtype=torch.float64)
    for b in range(bsz):
        for n in range(n_head):
            for i in range(qlen):
                q = wq[n] @ w[i, b]
                scores = []
                for j in range(mlen + i + 1):  # (a)+(c) content with u, (b)+(d) position with v
                    k = wk[n] @ cat[j, b]
                    rk = wr[n] @ sinusoid(mlen + i - j)
                    scores.append(((q + u[n]) @ k + (q + v[n]) @ rk) / math.sqrt(d_head))
                p = torch.softmax(torch.stack(scores), 0)
                expected[i, b, n] = sum(p[j] * (wv[n] @ cat[j, b]) for j in range(mlen + i + 1))
    direct = attn.layer_norm(w + attn.o_net(expected.reshape(qlen, bsz, -1)))
    torch.testing.assert_close(out, direct, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("qlen,mlen,mem_len", [(4, 0, 4), (4, 4, 4), (3, 5, 5), (6, 2, 4), (10, 0, 4), (4, 8, 8), (2, 3, 6)])
def test_masks_let_each_query_see_the_memory_and_itself_and_same_length_exactly_mem_len_plus_one(qlen, mlen, mem_len):
    klen = qlen + mlen
    causal = attn_mask(qlen, mlen, mem_len, False, torch.device("cpu"))
    same = attn_mask(qlen, mlen, mem_len, True, torch.device("cpu"))
    for i in range(qlen):
        for j in range(klen):
            dist = mlen + i - j
            assert bool(causal[i, j]) == (dist < 0)
            assert bool(same[i, j]) == (dist < 0 or dist > mem_len)  # NVIDIA's -1: mem_len + 1 keys visible
    if mlen == mem_len:
        assert ((~same).sum(1) == mem_len + 1).all()


def test_update_mems_keeps_the_last_mem_len_layer_inputs():
    mems = torch.arange(2 * 3 * 1 * 1.0).view(2, 3, 1, 1)
    hids = [torch.full((4, 1, 1), 100.0 + l) for l in range(2)]
    new = update_mems(hids, mems, mem_len=5)
    assert new.shape == (2, 5, 1, 1)
    assert torch.equal(new[:, :1], mems[:, 2:]) and torch.equal(new[1, 1:, 0, 0], torch.full((4,), 101.0))
    assert update_mems(hids, mems, mem_len=2).shape == (2, 2, 1, 1)


# --- memory ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("pre_lnorm,div_val,clamp_len", [(False, 1, -1), (True, 2, -1), (False, 2, 7)])
@pytest.mark.slow
def test_memory_across_segments_equals_recomputing_the_whole_context(pre_lnorm, div_val, clamp_len):
    cfg = tiny(pre_lnorm=pre_lnorm, div_val=div_val, clamp_len=clamp_len, mem_len=18, d_embed=16)
    model = model_of(cfg)
    tokens = torch.randint(0, 100, (18, 3))
    whole, _ = model.hidden(tokens, None, mem_len=0)
    mems, pieces = None, []
    for s in range(3):
        h, mems = model.hidden(tokens[6 * s: 6 * s + 6], mems)
        pieces.append(h)
        assert mems.shape == (2, min(18, 6 * (s + 1)), 3, 16)
    torch.testing.assert_close(torch.cat(pieces), whole, rtol=1e-10, atol=1e-10)


def test_a_short_memory_equals_recomputing_with_only_the_keys_it_keeps():
    """mem_len 4 < context: segment 2 sees 4 memory positions, i.e. the layer inputs of the
    last 4 tokens of segment 1 as computed in segment 1."""
    model = model_of(tiny(mem_len=4))
    tokens = torch.randint(0, 100, (12, 2))
    h1, mems = model.hidden(tokens[:6], None)
    h2, _ = model.hidden(tokens[6:], mems)
    # the same memory, built by hand: each layer's input over segment 1, last 4 positions
    hids, x = [], model.word_emb(tokens[:6])
    r = model.pos_emb(torch.arange(5.0, -1, -1, dtype=torch.float64))
    mask = attn_mask(6, 0, 4, False, x.device)
    for layer in model.layers:
        hids.append(x)
        x = layer(x, r, model.r_w_bias, model.r_r_bias, mask, x[:0])
    manual = torch.stack(hids)[:, -4:]
    torch.testing.assert_close(mems, manual, rtol=0, atol=0)
    torch.testing.assert_close(h1, x)
    assert h2.shape == (6, 2, 16)


def test_generation_with_the_cache_equals_recomputing_the_text():
    model = model_of(tiny(), dtype=torch.float32)
    tokens = torch.randint(0, 100, (1, 9))
    full = model(tokens)
    cache = model.new_kv_cache(1, 64)
    steps = [model(tokens[:, :4], cache=cache)] + [model(tokens[:, i:i + 1], cache=cache) for i in range(4, 9)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
    assert torch.allclose(full.exp().sum(-1), torch.ones(1, 9), atol=1e-5)


# --- adaptive input and softmax --------------------------------------------------------------------


@pytest.mark.parametrize("div_val,d_embed,tie,tie_projs", [
    (1, 16, True, None), (1, 8, True, [False, True, True, True]), (1, 8, False, None),
    (4, 16, True, [False, True, True, True]), (2, 16, False, [False, False, False, False])])
def test_adaptive_softmax_is_a_distribution_and_nll_reads_it(div_val, d_embed, tie, tie_projs):
    torch.manual_seed(0)
    emb = AdaptiveEmbedding(100, d_embed, 16, [20, 50, 80], div_val).double()
    crit = ProjectedAdaptiveLogSoftmax(100, d_embed, 16, [20, 50, 80], div_val, tie_projs, emb if tie else None).double()
    for p in list(emb.parameters()) + list(crit.parameters()):
        torch.nn.init.normal_(p, 0, 0.3)
    h = torch.randn(40, 16, dtype=torch.float64)
    target = torch.randint(0, 100, (40,))
    logp = crit.log_prob(h)
    torch.testing.assert_close(logp.exp().sum(1), torch.ones(40, dtype=torch.float64))
    torch.testing.assert_close(crit.nll(h, target), -logp.gather(1, target[:, None]).squeeze(1))
    # the two-level factorisation written out: p(token in bucket i) = p_head(cluster col -i) p_i(token)
    for t in (5, 30, 60, 95):
        i = sum(t >= c for c in (20, 50, 80))
        w, b, proj = crit.bucket(i)
        hp = h if proj is None else h @ proj
        lo = (0, 20, 50, 80)[i]
        hw, hb, hproj = crit.head()
        head = torch.log_softmax((h if hproj is None else h @ hproj) @ hw.t() + hb, -1)
        within = torch.log_softmax(hp @ w.t() + b, -1)[:, t - lo]
        expected = head[:, t] if i == 0 else head[:, 20 + 3 - i] + within
        torch.testing.assert_close(logp[:, t], expected)
    if tie:
        assert crit.bucket(1)[0] is emb.emb_layers[0 if div_val == 1 else 1].weight or div_val == 1
        assert not any(p is emb.emb_layers[0].weight for p in crit.parameters())


def test_without_clusters_the_adaptive_softmax_is_a_dense_softmax():
    emb = AdaptiveEmbedding(50, 16, 16, [], 1).double()
    crit = ProjectedAdaptiveLogSoftmax(50, 16, 16, [], 1, None, emb).double()
    torch.nn.init.normal_(crit.out_layers_biases[0])
    h = torch.randn(7, 16, dtype=torch.float64)
    dense = torch.log_softmax(h @ emb.emb_layers[0].weight.t() + crit.out_layers_biases[0], -1)
    torch.testing.assert_close(crit.log_prob(h), dense)
    t = torch.randint(0, 50, (7,))
    torch.testing.assert_close(crit.nll(h, t), F.cross_entropy(h @ emb.emb_layers[0].weight.t() + crit.out_layers_biases[0], t,
                                                               reduction="none"))


def test_adaptive_embedding_projects_each_bucket_and_scales_by_sqrt_d_model():
    torch.manual_seed(0)
    emb = AdaptiveEmbedding(100, 16, 8, [20, 50], div_val=2).double()
    for p in emb.parameters():
        torch.nn.init.normal_(p)
    tokens = torch.tensor([[0, 19, 20], [49, 50, 99]])
    out = emb(tokens)
    for (b, s), t in zip([(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)], tokens.flatten().tolist()):
        i, lo = (0, 0) if t < 20 else ((1, 20) if t < 50 else (2, 50))
        expected = emb.emb_projs[i] @ emb.emb_layers[i].weight[t - lo] * math.sqrt(8)
        torch.testing.assert_close(out[b, s], expected)
    assert [layer.weight.shape[1] for layer in emb.emb_layers] == [16, 8, 4]


# --- the reference's deterministic facts -----------------------------------------------------------


@pytest.mark.parametrize("kw,total,layers", [
    (dict(), 191_950_298, 54_599_680),
    (dict(n_layer=18, d_model=1024, n_head=16, d_head=64, d_inner=4096, div_val=4, init_std=0.005), 285_167_482, 245_532_672)])
def test_parameter_counts_of_the_wt103_models(kw, total, layers):
    with torch.device("meta"):
        model = TransformerXLModel(TransformerXLConfig(global_batch_size=256, **kw), 267_735)
    assert sum(p.numel() for p in model.parameters()) == total
    assert sum(p.numel() for p in model.layers.parameters()) == layers
    assert model.crit.head()[0].shape[0] == 20_000  # 19,997 shortlist + 3 clusters
    assert model.word_emb.emb_scale == math.sqrt(kw.get("d_model", 512))


def test_state_dict_names_are_the_references():
    model = model_of(tiny(div_val=2, d_embed=16, tie_projs=[False, True, True, True]))
    keys = set(model.state_dict())
    for k in ("r_w_bias", "r_r_bias", "pos_emb.inv_freq", "word_emb.emb_layers.3.weight", "word_emb.emb_projs.0",
              "layers.1.dec_attn.qkv_net.weight", "layers.1.dec_attn.r_net.weight", "layers.1.dec_attn.o_net.weight",
              "layers.1.dec_attn.layer_norm.weight", "layers.0.pos_ff.CoreNet.0.bias", "layers.0.pos_ff.CoreNet.3.weight",
              "layers.0.pos_ff.layer_norm.bias", "crit.cluster_weight", "crit.cluster_bias", "crit.out_layers_biases.2",
              "crit.out_projs.0"):
        assert k in keys, k
    assert not any(k.startswith("crit.out_projs.") and k != "crit.out_projs.0" for k in keys)  # tail projections tied
    assert not any(k.startswith("crit.out_layers_weights") for k in keys)  # tied weights live in word_emb
    inv = model.pos_emb.inv_freq
    torch.testing.assert_close(inv, torch.tensor([10000 ** (-2 * k / 16) for k in range(8)], dtype=inv.dtype))


def test_untied_weights_still_share_the_projections_tie_projs_names():
    """tie_weight = false leaves the output tables separate but, as the reference hands the
    embedding's projections to the softmax whatever tie_weight is, bucket i's projection is
    the input's when tie_projs[i]: WT103-large untied has the reference's 322,088,218
    parameters (not 344,064 more) and no crit.out_projs.1..3."""
    with torch.device("meta"):
        large = TransformerXLModel(TransformerXLConfig(global_batch_size=256, n_layer=18, d_model=1024, n_head=16,
                                                       d_head=64, d_inner=4096, div_val=4, tie_weight=False), 267_735)
    assert sum(p.numel() for p in large.parameters()) == 322_088_218
    model = model_of(tiny(div_val=2, d_embed=16, tie_weight=False, tie_projs=[False, True, True, True]))
    keys = set(model.state_dict())
    assert {k for k in keys if k.startswith("crit.out_projs.")} == {"crit.out_projs.0"}
    assert {f"crit.out_layers_weights.{i}" for i in range(4)} <= keys
    for i in (1, 2, 3):
        assert model.crit.bucket(i)[2] is model.word_emb.emb_projs[i]
        assert model.crit.bucket(i)[0] is model.crit.out_layers_weights[i]
    # div_val 1 with a projection: every tied bucket reads the one input projection
    one = model_of(tiny(d_embed=8, tie_weight=False, tie_projs=[False, True, True, True]))
    assert all(one.crit.bucket(i)[2] is one.word_emb.emb_projs[0] for i in (1, 2, 3))
    assert one.crit.bucket(0)[2] is one.crit.out_projs["0"]


def test_a_checkpoint_with_separate_tied_projections_is_refused_with_the_setting_that_loads_it():
    """mega used to ignore tie_projs when tie_weight = false: its checkpoints hold
    crit.out_projs.1..3 of their own. Loading one (strictly or not) names the key and the
    tie_projs that reproduces the model it was trained as, which then loads it."""
    from mega.errors import CheckpointError

    old = model_of(tiny(div_val=2, d_embed=16, tie_weight=False, tie_projs=[False, False, False, False]))
    state = old.state_dict()
    new = model_of(tiny(div_val=2, d_embed=16, tie_weight=False, tie_projs=[False, True, True, True]))
    for strict in (True, False):
        with pytest.raises(CheckpointError, match=r"crit\.out_projs\.1: .*model\.tie_projs=\[false,false,false,false\]"):
            new.load_state_dict(state, strict=strict)
    model_of(tiny(div_val=2, d_embed=16, tie_weight=False, tie_projs=[False, False, False, False])).load_state_dict(state)


@torch.no_grad()
def test_initialisation_follows_the_reference():
    torch.manual_seed(0)
    cfg = TransformerXLConfig(n_layer=2, d_model=128, n_head=4, d_head=32, d_inner=256, cutoffs=[1000, 2000], div_val=2,
                              init_std=0.02, proj_init_std=0.01, global_batch_size=2)
    model = TransformerXLModel(cfg, 5000)
    linears = torch.cat([m.weight.flatten() for m in model.modules() if isinstance(m, torch.nn.Linear)])
    assert linears.mean().abs() < 1e-3 and float(linears.std()) == pytest.approx(0.02, rel=0.02)
    norms = torch.cat([m.weight for m in model.modules() if isinstance(m, torch.nn.LayerNorm)])
    assert float(norms.mean()) == pytest.approx(1.0, abs=0.005) and float(norms.std()) == pytest.approx(0.02, rel=0.2)
    projs = torch.cat([p.flatten() for p in list(model.word_emb.emb_projs) + list(model.crit.out_projs.values())])
    assert float(projs.std()) == pytest.approx(0.01, rel=0.02)
    emb = torch.cat([m.weight.flatten() for m in model.word_emb.emb_layers])
    assert float(emb.std()) == pytest.approx(0.02, rel=0.02)
    biases = [m.bias for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.LayerNorm)) and m.bias is not None]
    assert all(float(b.abs().max()) == 0.0 for b in biases + list(model.crit.out_layers_biases) + [model.crit.cluster_bias])
    rb = torch.cat([model.r_w_bias.flatten(), model.r_r_bias.flatten(), model.crit.cluster_weight.flatten()])
    assert float(rb.std()) == pytest.approx(0.02, rel=0.2)


@torch.no_grad()
def test_uniform_init_covers_the_embedding_tables_unless_emb_init_says_otherwise():
    """The reference's weights_init draws nn.Embedding weights from `init` (its --emb_init
    is parsed but never read): init = "uniform" makes the tables U(-init_range, init_range)
    too. mega's emb_init, when set, still picks their own rule."""
    cfg = dict(n_layer=1, d_model=64, n_head=2, d_head=32, d_inner=64, cutoffs=[1000, 2000], div_val=2,
               global_batch_size=2, init="uniform", init_range=0.1)
    torch.manual_seed(0)
    model = TransformerXLModel(TransformerXLConfig(**cfg), 5000)
    for table in model.word_emb.emb_layers:
        w = table.weight
        assert float(w.abs().max()) <= 0.1 and float(w.abs().max()) > 0.099
        assert float(w.std()) == pytest.approx(0.1 / math.sqrt(3), rel=0.05)
    linears = torch.cat([m.weight.flatten() for m in model.modules() if isinstance(m, torch.nn.Linear)])
    assert float(linears.abs().max()) <= 0.1
    normal = TransformerXLModel(TransformerXLConfig(**cfg, emb_init="normal", init_std=0.02), 5000)
    assert float(normal.word_emb.emb_layers[0].weight.std()) == pytest.approx(0.02, rel=0.05)
    small = TransformerXLModel(TransformerXLConfig(**cfg, emb_init="uniform", emb_init_range=0.01), 5000)
    assert float(small.word_emb.emb_layers[0].weight.abs().max()) <= 0.01


# --- against Hugging Face's TransfoXL (the original code's port, in transformers 4.47) ----------------


@pytest.mark.parametrize("div_val,d_embed,pre_lnorm,clamp_len", [(1, 16, False, -1), (2, 16, True, 5), (1, 8, False, 4)])
@pytest.mark.slow
def test_log_probabilities_and_memory_equal_hugging_faces_transfo_xl(div_val, d_embed, pre_lnorm, clamp_len, monkeypatch):
    """The same weights in transformers' TransfoXLLMHeadModel (the original code's port;
    shared r biases: untie_r false; WT103's projection tying) give the same hidden states,
    log-probabilities and memory over three segments. (Its same_length mask is the
    original's klen - mem_len, one key fewer than NVIDIA's, so same_length stays off here;
    the masks test covers NVIDIA's.)"""
    transfo_xl = pytest.importorskip("transformers.models.deprecated.transfo_xl")
    type_as = torch.Tensor.type_as  # the deprecated port calls type_as(dtype=...), which torch no longer takes

    def type_as_or_dtype(self, other=None, dtype=None):
        return self.to(dtype) if other is None else type_as(self, other)

    monkeypatch.setattr(torch.Tensor, "type_as", type_as_or_dtype)
    cfg = tiny(div_val=div_val, d_embed=d_embed, pre_lnorm=pre_lnorm, clamp_len=clamp_len)
    model = model_of(cfg, dtype=torch.float32)
    with torch.no_grad():
        for b in model.crit.out_layers_biases:
            b.normal_(0, 0.5)
    hf_cfg = transfo_xl.TransfoXLConfig(
        vocab_size=100, cutoffs=[20, 50, 80], d_model=16, d_embed=d_embed, n_head=2, d_head=8, d_inner=32, div_val=div_val,
        pre_lnorm=pre_lnorm, n_layer=2, mem_len=6, clamp_len=clamp_len, same_length=False, proj_share_all_but_first=True,
        attn_type=0, sample_softmax=-1, adaptive=True, dropout=0.0, dropatt=0.0, untie_r=False, tie_word_embeddings=True)
    hf = transfo_xl.TransfoXLLMHeadModel(hf_cfg).eval()
    ours = {}
    for key in hf.state_dict():
        if key.endswith(("dec_attn.r_w_bias", "dec_attn.r_r_bias")):  # the shared biases, seen from each layer
            ours[key] = getattr(model, key.rsplit(".", 1)[1])
        elif key.startswith("transformer."):
            ours[key] = model.state_dict()[key[len("transformer."):]]
        elif key.startswith("crit.out_layers."):
            i, what = int(key.split(".")[2]), key.split(".")[3]
            if div_val == 1:
                ours[key] = model.word_emb.emb_layers[0].weight if what == "weight" else model.crit.out_layers_biases[0]
            else:
                ours[key] = model.crit.bucket(i)[0 if what == "weight" else 1]
        elif key.startswith("crit.out_projs."):
            ours[key] = model.crit.bucket(int(key.split(".")[2]))[2]
        elif key.startswith("crit.cluster_"):  # HF's forward reads cluster rows from the front, NVIDIA's from the end
            ours[key] = model.state_dict()[key].flip(0)
        else:
            ours[key] = model.state_dict()[key]
    hf.load_state_dict({k: v.detach().clone() for k, v in ours.items()})
    tokens = torch.randint(0, 100, (3, 18))
    # HF starts from mem_len zero vectors; the reference (and mega) from an empty memory
    mems, hf_mems = None, [torch.zeros(0, 3, 16) for _ in range(2)]
    with torch.no_grad():
        for s in range(3):
            x = tokens[:, 6 * s: 6 * s + 6]
            out = hf(input_ids=x, mems=hf_mems)
            hidden = hf.transformer(input_ids=x, mems=hf_mems).last_hidden_state
            hf_mems = out.mems
            h, mems = model.hidden(x.t(), mems)
            torch.testing.assert_close(h.transpose(0, 1), hidden, rtol=1e-5, atol=1e-5)
            logp = model.crit.log_prob(h.reshape(-1, 16)).view(6, 3, 100).transpose(0, 1)
            torch.testing.assert_close(logp, out.prediction_scores, rtol=1e-5, atol=1e-5)
            for layer in range(2):
                torch.testing.assert_close(mems[layer], hf_mems[layer], rtol=1e-5, atol=1e-5)


def test_config_errors_name_the_keys():
    from mega.errors import ConfigError

    with pytest.raises(ConfigError, match="tensor_model_parallel_size"):
        tiny(tensor_model_parallel_size=2).check()
    with pytest.raises(ConfigError, match="global_batch_size"):
        tiny(global_batch_size=None).check()
    with pytest.raises(ConfigError, match="cutoffs"):
        TransformerXLModel(tiny(cutoffs=[20, 50, 120]), 100)
    with pytest.raises(ConfigError, match="tie_projs"):
        tiny(tie_projs=[False, True]).check()
    with pytest.raises(ValueError, match="seq_length=64 are the same setting"):
        tiny(seq_length=64, tgt_len=32)
    assert tiny(tgt_len=12).seq_length == 12
