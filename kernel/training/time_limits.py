"""When training must stop for time: `trainer.max_time` and `exp_manager.max_time_per_run`.

Both are NeMo's keys, in its "DD:HH:MM:SS" form (or a table of days, hours, minutes,
seconds, as Lightning accepts), and both are checked after every step, the decision taken
by all ranks together (a rank whose clock is past the limit stops every rank at that step,
so none waits in a collective for the others):

* `trainer.max_time` is Lightning's Timer: training time summed over every start of the
  run (checkpoints carry it as `trainer.time_elapsed_s`). A run that reaches it saves a
  checkpoint and ends as a finished run does (exit 0); starting it again does nothing
  until the limit is raised, like Lightning, whose restored Timer stops at once.
* `exp_manager.max_time_per_run` is NeMo's StatelessTimer: the time of this start only, so
  a job under a scheduler's time limit stops cleanly before it, and the next job (a
  requeue, a dependent job) resumes and trains another stretch.

The clock starts when training starts (after the run is built and resumed), as both of
theirs do: set the limit below a job's wall-clock limit by the start-up, one step and one
checkpoint save.
"""
from __future__ import annotations

import datetime
from typing import Optional


def _hms(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(seconds)))


def budget_spent(run) -> Optional[str]:
    """Why a resumed run has nothing to do for `trainer.max_time` (None: it may train)."""
    limit = run.config.trainer.max_time
    if limit is not None and run.time_before_s >= limit.seconds:
        return (f"trainer.max_time={limit} is spent (this run has trained {_hms(run.time_before_s)}); raise it to train"
                " on to trainer.max_steps")
    return None


def limit_reached(run) -> Optional[str]:
    """The key whose limit this rank's clock has reached (None: none)."""
    tr, em = run.config.trainer, run.config.exp_manager
    if tr.max_time is not None and run.time_elapsed_s >= tr.max_time.seconds:
        return "trainer.max_time"
    if em.max_time_per_run is not None and run.time_this_start() >= em.max_time_per_run.seconds:
        return "exp_manager.max_time_per_run"
    return None


def stopped_message(run, key: Optional[str], path) -> str:
    """What a run stopped for time says (`key`: this rank's reason; another rank's clock
    may have decided when it is None)."""
    tr, em = run.config.trainer, run.config.exp_manager
    if key is None:  # another rank's clock passed first: name whichever limit is set
        key = "trainer.max_time" if tr.max_time is not None else "exp_manager.max_time_per_run"
    if key == "trainer.max_time":
        then = "raise trainer.max_time and re-run the same command to train on"
        limit = tr.max_time
    else:
        then = "re-run the same command to resume"
        limit = em.max_time_per_run
    return (f"{key}={limit} reached after step {run.step} (trained {_hms(run.time_elapsed_s)} in all,"
            f" {_hms(run.time_this_start())} in this start): checkpoint saved at {path}; {then}")
