"""BERT samples carry their predicted positions (`lm_positions`, padded to a fixed count,
as NVIDIA's `masked_lm_positions`), so the LM head runs on a fixed number of rows with no
host read (issue 24). Same loss and gradients as picking the rows by the mask."""
from __future__ import annotations

import pytest
import torch

import mega
from mega.config import config_from_dict
from mega.testing import tiny_preset


def _run(tmp_path, **model):
    from mega.training.run import build_run

    raw = tiny_preset("bert", tmp_path, trainer={"max_steps": 2, "val_check_interval": 0}, model=model)
    return build_run(config_from_dict(raw, [], mega.get_plugins()))


def test_samples_list_their_predicted_positions_padded_with_cls(tmp_path):
    from mega.plugins.data.bert_samples import lm_capacity

    run = _run(tmp_path)
    cfg = run.config.model
    cap = lm_capacity(cfg.seq_length, cfg.masked_lm_prob, cfg.max_predictions_per_seq)
    assert cap == 5  # ceil(32 x 0.15)
    for i in range(len(run.train_data)):
        s = run.train_data[i]
        predicted = s["loss_mask"].nonzero().squeeze(1)
        assert s["lm_positions"].shape == (cap,)
        assert torch.equal(s["lm_positions"][: len(predicted)], predicted)
        assert (s["lm_positions"][len(predicted):] == 0).all() and s["loss_mask"][0] == 0


def test_max_predictions_per_seq_caps_the_positions():
    from mega.plugins.data.bert_samples import lm_capacity

    assert lm_capacity(128, 0.15, None) == 20 and lm_capacity(512, 0.15, 20) == 20 and lm_capacity(8, 0.01, None) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_loss_and_gradients_equal_the_mask_picked_rows(tmp_path, dtype):
    from mega.training.batches import load_micro_batches, micro_batch_positions

    run = _run(tmp_path)
    model = run.model.to(dtype).eval()  # no dropout: both forwards see the same network
    batch = load_micro_batches(run.train_data, micro_batch_positions(0, 8, 8, 0, 1), torch.device("cpu"))[0]
    assert "lm_positions" in batch and batch["loss_mask"].sum() > 0
    out = {}
    for name, b in (("positions", batch), ("mask", {k: v for k, v in batch.items() if k != "lm_positions"})):
        model.zero_grad(set_to_none=True)
        loss = model.training_loss(b)
        total = loss["loss_sum"] + loss["sample_loss_sum"]
        total.backward()
        out[name] = (loss["loss_sum"].detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(out["positions"][0], out["mask"][0], rtol=tol, atol=tol)
    assert out["positions"][1].keys() == out["mask"][1].keys()
    for n, g in out["mask"][1].items():
        torch.testing.assert_close(out["positions"][1][n], g, rtol=tol * 10, atol=tol, msg=n)
