"""Run a function on N local ranks (gloo, CPU) and collect what each returns: how a plugin
author shows tensor-parallel equals one process.

    from mega.testing import full_grads, run_ranks

    def _loss_and_grads(parallel, seed):       # module level: each rank imports it
        model = build_my_model(seed)           # reads mega.runtime.parallel.current()
        loss = model.training_loss(batch)["loss_sum"]
        loss.backward()
        return loss.item(), full_grads(model, parallel)

    def test_tp2_equals_one_process():
        one = _loss_and_grads_in_this_process(...)
        two = run_ranks(_loss_and_grads, world=2, tp=2, args=(0,))
        assert two[0][0] == pytest.approx(one[0])

Each rank is a spawned process that joins a process group through a file rendezvous and
sets up mega's parallel layout as a launched worker would (one thread each, so results
do not depend on the machine); a rank that raises or hangs fails the test with its
traceback, within `timeout` seconds.
"""
from __future__ import annotations

import os
import pickle
import tempfile
import traceback



def _worker(rank, world, tp, pp, init_file, out_dir, fn, args):
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)})
    import torch

    torch.set_num_threads(1)
    result_path = os.path.join(out_dir, f"rank{rank}.pkl")
    try:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
        from mega.runtime.parallel import init_parallel, shutdown_parallel

        state = init_parallel(world, 1, 120, tp, pp)
        result = ("ok", fn(state, *args))
        shutdown_parallel()
    except BaseException:
        result = ("error", traceback.format_exc())
    with open(result_path, "wb") as f:
        pickle.dump(result, f)


def run_ranks(fn, world: int, tp: int = 1, pp: int = 1, args=(), timeout: float = 120):
    """fn(parallel_state, *args) on each rank; returns the list of results by rank."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        init_file = os.path.join(d, "rendezvous")
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_worker, args=(r, world, tp, pp, init_file, d, fn, args)) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
        if hung:
            raise TimeoutError(f"ranks {hung} did not finish within {timeout}s")
        results, errors = [], []
        for r in range(world):
            path = os.path.join(d, f"rank{r}.pkl")
            if not os.path.exists(path):
                errors.append(f"rank {r} died without a result (exit code {procs[r].exitcode})")
                continue
            with open(path, "rb") as f:
                status, value = pickle.load(f)
            if status == "error":
                errors.append(f"rank {r} failed:\n{value}")
            results.append(value)
        if errors:
            raise RuntimeError("\n".join(errors))
        return results


def full_grads(model, state) -> dict:
    """Each parameter's gradient as one process would hold it: tensor-parallel shards
    gathered along their partition dimension, block by block for a tensor split in blocks
    (a gated fc1), for TP == one-process comparisons."""
    import torch
    import torch.distributed as dist

    from mega.runtime.sharding import merge_ranks

    grads = {}
    for name, p in model.named_parameters():
        grad = p.grad
        if p.partition_dim is not None and state.tp_size > 1:
            parts = [torch.empty_like(grad) for _ in range(state.tp_size)]
            dist.all_gather(parts, grad.contiguous(), group=state.tp_group)
            grad = merge_ranks(parts, p.partition_dim, getattr(p, "partition_chunks", 1))
        grads[name] = grad
    return grads
