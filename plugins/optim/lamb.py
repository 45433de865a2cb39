"""The `lamb` and `fused_lamb` optimizers: LAMB as NVIDIA's Transformer-XL trains with it.

`lamb` follows the rule of that reference (its `Lamb`/`JITLamb`), which is not the final
LAMB paper's. For every parameter tensor p with gradient g (each tensor is its own
"layer", biases and norms included):

    m = b1 m + (1 - b1) g            v = b2 v + (1 - b2) g^2     (no bias correction)
    u = m / (sqrt(v) + eps) + weight_decay * p                   (decay inside the trust ratio)
    w = min(||p||, 10)               a = ||u||
    trust = w / (a + eps), or 1 when w == 0 or a == 0
    p = p - lr * trust * u

eps defaults to 1e-6 (the reference's constructor default). The zero-norm case keeps
zero-initialised tensors moving (their first step is a plain, non-debiased Adam step), and
the clamp at 10 caps how far a large tensor (a whole embedding matrix) moves per step.
Differences from the reference, both deliberate: the kernel's parameter groups give biases
and norm weights no weight decay (the reference decays every tensor; its configs use 0
anyway), and under tensor parallelism the norms of a split tensor are summed over its
shards, so the trust ratio is the one of the whole tensor, as in one process.

`fused_lamb` is NVIDIA apex's `FusedLAMB`, opt-in, for when apex (built from
github.com/NVIDIA/apex, not the unrelated PyPI package of that name) is installed. It is a
different rule (see docs/transformer-xl.md): bias correction, no clamp of ||p||, the trust
ratio only for groups with weight decay, its own gradient clipping at max_grad_norm.
"""
from __future__ import annotations

from typing import ClassVar, List, Optional

import torch
from attrs import define, field

import mega
from mega.config import OptimConfig
from mega.config.schema import non_negative, positive
from mega.errors import ConfigError

MAX_WEIGHT_NORM = 10.0  # the reference's clamp of ||p|| (phi(z) = min(z, 10))


@define(kw_only=True)
class LambConfig(OptimConfig):
    """`model.optim.*` of `lamb`: the reference's defaults (Transformer-XL trains with
    lr 0.01 and no weight decay)."""

    sharding: ClassVar[Optional[str]] = "per_tensor_norms"  # the trust ratio's norms are summed over the shards

    name: str = "lamb"
    lr: float = field(default=0.01, validator=positive)  # peak learning rate
    weight_decay: float = field(default=0.0, validator=non_negative)  # added to the Adam step, inside the trust ratio
    betas: List[float] = field(factory=lambda: [0.9, 0.999])  # moment decay rates b1, b2
    eps: float = field(default=1e-6, validator=positive)  # in sqrt(v) + eps and in the trust ratio's denominator
    adam: bool = False  # trust ratio always 1 (the reference Lamb's comparison switch): a non-debiased Adam


@define(kw_only=True)
class FusedLambConfig(OptimConfig):
    """`model.optim.*` of `fused_lamb` (apex FusedLAMB's keyword arguments)."""

    name: str = "fused_lamb"
    lr: float = field(default=0.01, validator=positive)  # peak learning rate
    weight_decay: float = field(default=0.01, validator=non_negative)  # apex's default; groups with 0 take plain Adam steps
    betas: List[float] = field(factory=lambda: [0.9, 0.999])  # moment decay rates b1, b2
    eps: float = field(default=1e-6, validator=positive)  # in sqrt(v_hat) + eps only
    bias_correction: bool = True  # apex default: debiased moments
    adam_w_mode: bool = True  # decoupled decay (u += wd p); False: L2 added to the gradient
    grad_averaging: bool = True  # m accumulates (1 - b1) g; False: g
    max_grad_norm: float = field(default=1.0, validator=non_negative)  # apex clips the global grad norm itself; 0 disables
    use_nvlamb: bool = False  # trust ratio for groups without weight decay too


def _betas(betas) -> tuple:
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ConfigError(f"model.optim.betas: expected two numbers in [0, 1), got {list(betas)!r}")
    return float(betas[0]), float(betas[1])


class Lamb(torch.optim.Optimizer):
    """The reference's LAMB rule (module docstring), with multi-tensor ops and no host
    synchronisation (the zero-norm case is a `where`, as the reference's JIT kernel does).
    Moments and norms are computed in the parameter's dtype; mega keeps fp32 parameters."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0,
                 adam: bool = False):
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"lr, eps and weight_decay must be non-negative (got {lr}, {eps}, {weight_decay})")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, adam=adam))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = [(group, [p for p in group["params"] if p.grad is not None]) for group in self.param_groups]
        shards = getattr(self, "dp_shards", None)  # set by the kernel's distributed optimizer
        if shards is not None:
            self._sharded_step(work, shards)
            return loss
        for group, params in work:
            if params:
                self._update(group, params)
        return loss

    def _update(self, group: dict, params: List[torch.Tensor]) -> None:
        updates = self._updates(group, params)
        w_norm, a_norm = _norms(params, updates)
        self._apply(group, params, updates, w_norm, a_norm)

    def _sharded_step(self, work, shards) -> None:
        """Under `model.optim.use_distributed_optimizer` each parameter here is a 1-D shard
        of a parameter (`dp_shard_of = (index, numel)` among the `shards.num_params` of this
        model-parallel rank): its squared norms are added into a [P, 2] table by parent,
        summed over the data-parallel group (one all-reduce per step, which every rank
        joins, with or without shards in a group), then over the tensor-parallel group for
        split tensors; every shard reads its whole tensor's norms (up to summation order)."""
        updates = [self._updates(group, params) if params else [] for group, params in work]
        flat_p = [p for _, params in work for p in params]
        flat_u = [u for us in updates for u in us]
        device = flat_p[0].device if flat_p else shards.device
        table = torch.zeros(shards.num_params, 2, dtype=torch.float32, device=device)
        if flat_p:
            index = torch.tensor([p.dp_shard_of[0] for p in flat_p], device=device)
            w_sq = torch.stack([n.float() for n in torch._foreach_norm(flat_p)]).pow(2)
            a_sq = torch.stack([n.float() for n in torch._foreach_norm(flat_u)]).pow(2)
            table.index_add_(0, index, torch.stack([w_sq, a_sq], dim=1))
        if shards.dp_size > 1:
            torch.distributed.all_reduce(table, group=shards.dp_group)
        from mega.runtime.parallel import current

        state = current()
        if state.tp_size > 1:
            split = torch.tensor(shards.split_mask, device=device)
            if bool(split.any()):
                both = torch.where(split[:, None], table, 0.0)
                torch.distributed.all_reduce(both, group=state.tp_group)
                table = torch.where(split[:, None], both, table)
        norms = table.sqrt()
        for (group, params), us in zip(work, updates):
            if params:
                index = torch.tensor([p.dp_shard_of[0] for p in params], device=device)
                self._apply(group, params, us, norms[index, 0], norms[index, 1])

    def _updates(self, group: dict, params: List[torch.Tensor]) -> List[torch.Tensor]:
        """The Adam-like step u of each tensor (moments updated in place)."""
        b1, b2 = group["betas"]
        eps, wd = group["eps"], group["weight_decay"]
        grads, ms, vs = [], [], []
        for p in params:
            if p.grad.is_sparse:
                raise RuntimeError("lamb does not support sparse gradients")
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1  # counted, never used: the rule has no bias correction
            grads.append(p.grad)
            ms.append(state["exp_avg"])
            vs.append(state["exp_avg_sq"])
        torch._foreach_mul_(ms, b1)
        torch._foreach_add_(ms, grads, alpha=1 - b1)
        torch._foreach_mul_(vs, b2)
        torch._foreach_addcmul_(vs, grads, grads, value=1 - b2)
        denom = torch._foreach_sqrt(vs)
        torch._foreach_add_(denom, eps)
        updates = torch._foreach_div(ms, denom)
        if wd != 0:
            torch._foreach_add_(updates, params, alpha=wd)
        return updates

    def _apply(self, group: dict, params: List[torch.Tensor], updates: List[torch.Tensor], w_norm: torch.Tensor,
               a_norm: torch.Tensor) -> None:
        """p -= lr * trust * u, with the trust ratio from the tensors' norms."""
        eps, lr = group["eps"], group["lr"]
        w_norm = w_norm.clamp(0, MAX_WEIGHT_NORM)
        trust = torch.where((w_norm == 0) | (a_norm == 0), torch.ones_like(w_norm), w_norm / (a_norm + eps))
        if group.get("adam", False):
            trust = torch.ones_like(trust)
        scale = (-lr * trust).to(updates[0].dtype).unbind(0)
        torch._foreach_mul_(updates, scale)
        torch._foreach_add_(params, updates)


def _norms(params: List[torch.Tensor], updates: List[torch.Tensor]):
    """(||p||, ||u||) per tensor, as two 1-D tensors. Under tensor parallelism the squared
    norms of split tensors (`partition_dim` set) are summed over the tensor-parallel group,
    so each rank sees the whole tensor's norm; replicated tensors are whole on every rank."""
    dtype = torch.float32
    for p in params:  # fp32 math, or fp64 for fp64 parameters
        dtype = torch.promote_types(dtype, p.dtype)
    w_sq = torch.stack([n.to(dtype) for n in torch._foreach_norm(params)]).pow(2)
    a_sq = torch.stack([n.to(dtype) for n in torch._foreach_norm(updates)]).pow(2)
    from mega.runtime.parallel import current

    state = current()
    if state.tp_size > 1:
        split = torch.tensor([getattr(p, "partition_dim", None) is not None for p in params], device=w_sq.device)
        if bool(split.any()):
            both = torch.stack([torch.where(split, w_sq, 0.0), torch.where(split, a_sq, 0.0)])
            torch.distributed.all_reduce(both, group=state.tp_group)
            w_sq = torch.where(split, both[0], w_sq)
            a_sq = torch.where(split, both[1], a_sq)
    return w_sq.sqrt(), a_sq.sqrt()


def build_lamb(config: LambConfig, param_groups) -> torch.optim.Optimizer:
    return Lamb(param_groups, lr=config.lr, betas=_betas(config.betas), eps=config.eps,
                weight_decay=config.weight_decay, adam=config.adam)


def _apex_fused_lamb() -> Optional[type]:
    """apex.optimizers.FusedLAMB when NVIDIA apex with its CUDA extensions is importable."""
    try:
        from apex.optimizers import FusedLAMB  # NVIDIA apex; the PyPI `apex` has no such module
    except Exception:  # ImportError, or apex built without its extensions
        return None
    return FusedLAMB


def build_fused_lamb(config: FusedLambConfig, param_groups) -> torch.optim.Optimizer:
    fused = _apex_fused_lamb()
    if fused is None:
        raise ConfigError(
            "model.optim.name=\"fused_lamb\": NVIDIA apex is not installed (apex.optimizers.FusedLAMB cannot be"
            " imported; build it from https://github.com/NVIDIA/apex with its CUDA extensions, not the PyPI package"
            " `apex`). Use name = \"lamb\", the Transformer-XL reference's rule, which needs nothing extra")
    return fused(param_groups, lr=config.lr, betas=_betas(config.betas), eps=config.eps,
                 weight_decay=config.weight_decay, bias_correction=config.bias_correction,
                 adam_w_mode=config.adam_w_mode, grad_averaging=config.grad_averaging,
                 max_grad_norm=config.max_grad_norm, use_nvlamb=config.use_nvlamb)


@mega.hookimpl
def register_optimizers(register):
    register("lamb", build_lamb, config=LambConfig)
    register("fused_lamb", build_fused_lamb, config=FusedLambConfig)
