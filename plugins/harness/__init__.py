"""The `lm_eval` evaluation harness: `mega evaluate RUN --harness TASKS` scores a checkpoint
on lm-evaluation-harness tasks through the `mega` lm-eval model (`lm_eval_model.py`), the
short form of `lm_eval --model mega --model_args run=RUN --tasks TASKS`.

lm-eval is optional (`pip install 'mega-lm[lm_eval]'`): this module imports it only when a
harness runs, so mega works without it and says which extra to install when asked for it.
"""
from __future__ import annotations

import importlib.util
from typing import List, Mapping

import mega
from mega.errors import ConfigError


def require_lm_eval(key: str) -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise ConfigError(f"{key}: lm-evaluation-harness is not installed; pip install 'mega-lm[lm_eval]'")


def run_lm_eval(checkpoint: str, tasks: List[str], options: Mapping, plugins=None) -> dict:
    """lm-eval's results (`simple_evaluate`'s dict, per-request samples left out) of the
    checkpoint on `tasks`. `options`: include_path (a folder of task YAMLs), num_fewshot,
    limit, batch_size, device, overrides (checkpoint config overrides)."""
    require_lm_eval("--harness")
    import lm_eval
    from lm_eval.tasks import TaskManager

    from mega.plugins.harness.lm_eval_model import MegaLM

    manager = TaskManager(include_path=options.get("include_path"))
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:  # before the model is built
        raise ConfigError(f"--harness: unknown lm-eval task(s) {', '.join(unknown)}"
                          f"{'' if options.get('include_path') else ' (a task of your own: --include-path DIR)'}")
    model = MegaLM(run=str(checkpoint), batch_size=options.get("batch_size") or 1, device=options.get("device"),
                   overrides=";".join(options.get("overrides") or ()))
    results = lm_eval.simple_evaluate(model=model, tasks=list(tasks), num_fewshot=options.get("num_fewshot"),
                                      limit=options.get("limit"), task_manager=manager,
                                      log_samples=bool(options.get("log_samples")))
    return results


@mega.hookimpl
def register_evaluation_harnesses(register):
    register("lm_eval", run_lm_eval)
