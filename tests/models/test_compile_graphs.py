"""Compilation without graph breaks (issue 24): `mega run` with `trainer.compile` on each
model family's tiny preset, counted by torch._dynamo on the CPU, and the one line the run
logs after REPORT_STEP (graphs, graph breaks with reasons, recompilations after step 1).

torch.compile runs with the `aot_eager` backend here: dynamo traces and AOTAutograd
derives the backward exactly as with inductor (what decides graphs, breaks and
recompilations), without inductor's C++ code generation, which takes minutes on this CPU."""
from __future__ import annotations

import functools
import logging
import re

import pytest

import mega
from mega.config import config_from_dict
from mega.runtime.compile import REPORT_STEP, CompileStats
from mega.testing import tiny_preset

from tests.helpers.model_tables import T5_HIDDENS


def compile_line(tmp_path, monkeypatch, caplog, name, steps=REPORT_STEP + 1, **sections):
    """(graphs, breaks, recompilations, the logged line, the run) of a compiled tiny run."""
    import torch._dynamo

    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    trainer = {"max_steps": steps, "log_every_n_steps": steps, "val_check_interval": 0, "compile": True,
               **sections.pop("trainer", {})}
    config = config_from_dict(tiny_preset(name, tmp_path, trainer=trainer, **sections), [], mega.get_plugins())
    with caplog.at_level(logging.INFO, logger="mega"):
        run = mega.run(config)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("trainer.compile: after step")]
    assert len(lines) == 1, [r.getMessage() for r in caplog.records if "trainer.compile" in r.getMessage()]
    m = re.match(r"trainer.compile: after step (\d+): (\d+) graph\(s\), (\d+) graph break\(s\)(?: \((.*)\))?, "
                 r"(\d+) recompilation\(s\) after step 1$", lines[0])
    assert m, lines[0]
    assert int(m.group(1)) == REPORT_STEP
    return int(m.group(2)), int(m.group(3)), int(m.group(5)), lines[0], run


@pytest.mark.parametrize("name,sections", [
    ("gpt", {}),
    ("gpt", {"trainer": {"precision": "bf16"}}),
    ("gpt", {"trainer": {"precision": "bf16"}, "model": {"megatron_amp_O2": True}}),
    ("gpt", {"model": {"loss_chunk_size": 16}}),
    pytest.param("bert", {}, marks=pytest.mark.slow),
    pytest.param("t5", {"model": T5_HIDDENS}, marks=pytest.mark.slow),
    pytest.param("bart", {}, marks=pytest.mark.slow),
], ids=["gpt", "gpt-bf16", "gpt-bf16-O2", "gpt-chunked-loss", "bert", "t5-hiddens", "bart"])
def test_compiled_step_is_one_graph_without_breaks_or_recompilation(tmp_path, monkeypatch, caplog, name, sections):
    graphs, breaks, recompiled, line, run = compile_line(tmp_path, monkeypatch, caplog, name, **sections)
    assert (graphs, breaks, recompiled) == (1, 0, 0), line
    assert not run.loss_module.fallen_back


@pytest.mark.slow
@pytest.mark.parametrize("sections", [{}, {"trainer": {"precision": "bf16"}, "model": {"megatron_amp_O2": True}}],
                         ids=["fp32", "bf16-O2"])
def test_transformer_xl_compiles_to_one_graph_with_its_memory_carried(tmp_path, monkeypatch, caplog, sections):
    """The memory is one full-length device buffer gathered by the batch's stream ids (no
    dict looked up with a host-read slot: that was 1 break) allocated with the model (no
    shape growing over the first steps: 2 recompilations), and the reached-bucket flags are
    one device tensor updated in place (Python bools turning into tensors: 1 more)."""
    graphs, breaks, recompiled, line, run = compile_line(tmp_path, monkeypatch, caplog, "transformer_xl", **sections)
    assert (graphs, breaks, recompiled) == (1, 0, 0), line
    assert not run.loss_module.fallen_back


@pytest.mark.slow
def test_transformer_xl_compiled_step_has_no_data_dependent_shape(tmp_path, monkeypatch, caplog):
    """What a CUDA graph (mode="reduce-overhead") needs: with dynamo no longer allowed to
    trace `nonzero` or `.item()` (each would break the graph), the step is still one graph:
    the buckets run with fixed shapes under compile and the memory slot is not read."""
    import contextlib

    import mega.runtime.compile as compile_mod

    monkeypatch.setattr(compile_mod, "_data_dependent_ops_traced", contextlib.nullcontext)
    graphs, breaks, recompiled, line, run = compile_line(tmp_path, monkeypatch, caplog, "transformer_xl")
    assert (graphs, breaks, recompiled) == (1, 0, 0), line
    assert not run.loss_module.fallen_back


def test_a_later_recompilation_is_logged_once(monkeypatch):
    """CompileStats: the summary at REPORT_STEP, then one line per step that compiled anew."""
    from torch._dynamo.utils import counters

    stats = CompileStats()
    counters["stats"]["unique_graphs"] += 1
    assert stats.after_step(1) is None and stats.after_step(2) is None
    assert stats.after_step(3) == ("trainer.compile: after step 3: 1 graph(s), 0 graph break(s), "
                                   "0 recompilation(s) after step 1")
    assert stats.after_step(4) is None
    counters["stats"]["unique_graphs"] += 1
    counters["graph_break"]["Tensor.item() call\nmore text"] += 2
    line = stats.after_step(5)
    assert line.startswith("trainer.compile: recompiled at step 5") and "1 recompilation(s)" in line
    assert "2 graph break(s) (2 x Tensor.item() call)" in line
    assert stats.after_step(6) is None
    counters["graph_break"].pop("Tensor.item() call\nmore text")


def test_a_run_shorter_than_the_report_step_reports_at_its_end():
    stats = CompileStats()
    assert stats.after_step(1, last=True).startswith("trainer.compile: after step 1: 0 graph(s)")
