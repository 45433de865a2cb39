"""Pipeline parallelism: the non-interleaved 1F1B schedule over point-to-point sends.

Stage p runs its layers for every micro-batch of a global batch. After a warm-up of
(stages - p - 1) forwards, each stage alternates one forward and one backward, so at most
`stages` micro-batches' activations are alive at once; then it drains the remaining
backwards. Activations go forward and their gradients come back through batched
isend/irecv pairs (deadlock-free on gloo and NCCL alike).

A model that supports pipelining provides `stage_forward(batch, hidden)`: the first stage
ignores `hidden` and embeds the batch's tokens; a middle stage returns hidden states; the
last stage returns the `training_loss` dict. `activation_shape(batch)` gives the shape of
hidden states between stages. After the schedule, the word embedding shared by the first
and last stage gets its gradient summed over the two (seeds/001's
`setup_embeddings_and_output_layer`).
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from mega.runtime.precision import autocast


def _p2p(device, send: Optional[torch.Tensor] = None, send_to: Optional[int] = None,
         recv_shape=None, recv_from: Optional[int] = None) -> Optional[torch.Tensor]:
    ops, buf = [], None
    if send is not None:
        ops.append(dist.P2POp(dist.isend, send.detach().contiguous(), send_to))
    if recv_shape is not None:
        buf = torch.empty(recv_shape, device=device, dtype=torch.float32)
        ops.append(dist.P2POp(dist.irecv, buf, recv_from))
    if ops:
        for req in dist.batch_isend_irecv(ops):
            req.wait()
    return buf


class PipelineStep:
    """One global batch through the pipeline on this stage."""

    def __init__(self, run, micro_batches: List[Dict[str, torch.Tensor]], num_tokens: torch.Tensor):
        self.run, self.mbs, self.num_tokens = run, micro_batches, num_tokens
        st = run.parallel
        self.st = st
        self.first, self.last = st.is_first_stage, st.is_last_stage
        self.prev = None if self.first else st.pp_ranks[st.pp_rank - 1]
        self.next = None if self.last else st.pp_ranks[st.pp_rank + 1]
        self.shape = run.model.activation_shape(micro_batches[0])
        self.loss = torch.zeros((), device=run.device)
        self.terms: Dict[str, torch.Tensor] = {}

    # --- communication ---------------------------------------------------------------
    def recv_forward(self):
        if self.first:
            return None
        x = _p2p(self.run.device, recv_shape=self.shape, recv_from=self.prev)
        return x.requires_grad_(torch.is_grad_enabled())

    def send_forward(self, out):
        if not self.last:
            _p2p(self.run.device, send=out, send_to=self.next)

    def send_forward_recv_backward(self, out):
        if self.last:
            return None
        return _p2p(self.run.device, send=out, send_to=self.next, recv_shape=self.shape, recv_from=self.next)

    def send_backward(self, grad):
        if not self.first:
            _p2p(self.run.device, send=grad, send_to=self.prev)

    def send_backward_recv_forward(self, grad):
        if self.first:
            return None
        x = _p2p(self.run.device, send=grad, send_to=self.prev, recv_shape=self.shape, recv_from=self.prev)
        return x.requires_grad_(True)

    def recv_backward(self):
        if self.last:
            return None
        return _p2p(self.run.device, recv_shape=self.shape, recv_from=self.next)

    # --- compute ---------------------------------------------------------------------
    def forward(self, i: int, hidden):
        run = self.run
        with autocast(run.config.trainer.precision, run.device):
            out = run.model.stage_forward(self.mbs[i], hidden)
        if not self.last:
            return out.float()
        loss = out["loss_sum"] / self.num_tokens
        self.loss += loss.detach()
        for name, value in out.get("terms", {}).items():
            self.terms[name] = self.terms.get(name, 0.0) + value.detach() / self.num_tokens
        scale = run.scaler.scale if run.scaler is not None else 1.0
        return loss * scale if scale != 1.0 else loss

    @staticmethod
    def backward(inp, out, grad_out):
        torch.autograd.backward(out, grad_tensors=grad_out)
        return inp.grad if inp is not None else None

    # --- schedules ---------------------------------------------------------------------
    def forward_only(self):
        for i in range(len(self.mbs)):
            self.send_forward(self.forward(i, self.recv_forward()))
        return self._results()

    def one_f_one_b(self):
        m = len(self.mbs)
        warmup = min(self.st.pp_size - self.st.pp_rank - 1, m)
        inputs, outputs = [], []
        for i in range(warmup):
            inp = self.recv_forward()
            out = self.forward(i, inp)
            self.send_forward(out)
            inputs.append(inp)
            outputs.append(out)
        remaining = m - warmup
        inp = self.recv_forward() if remaining > 0 else None
        for i in range(remaining):
            out = self.forward(warmup + i, inp)
            grad_out = self.send_forward_recv_backward(out)
            inputs.append(inp)
            outputs.append(out)
            grad_in = self.backward(inputs.pop(0), outputs.pop(0), grad_out)
            if i == remaining - 1:
                self.send_backward(grad_in)
            else:
                inp = self.send_backward_recv_forward(grad_in)
        for _ in range(warmup):
            grad_in = self.backward(inputs.pop(0), outputs.pop(0), self.recv_backward())
            self.send_backward(grad_in)
        self._sync_shared_embedding()
        return self._results()

    def _sync_shared_embedding(self):
        st = self.st
        if st.embedding_group is None or not (self.first or self.last):
            return
        w = self.run.model.shared_embedding_or_output_weight()
        if w.grad is None:
            w.grad = torch.zeros_like(w)
        dist.all_reduce(w.grad, group=st.embedding_group)

    def _results(self):
        """Loss and terms, broadcast from the last stage to every stage of the pipeline."""
        names = sorted(self.terms) if self.last else None
        box = [names]
        dist.broadcast_object_list(box, src=self.st.pp_ranks[-1], group=self.st.pp_group)
        names = box[0]
        values = torch.stack([self.loss] + [self.terms[n] if self.last else torch.zeros(()) for n in names]).to(self.run.device)
        dist.broadcast(values, src=self.st.pp_ranks[-1], group=self.st.pp_group)
        return values[0], dict(zip(names, values[1:]))


def pipeline_forward_backward(run, micro_batches, num_tokens, forward_only: bool = False):
    step = PipelineStep(run, micro_batches, num_tokens)
    return step.forward_only() if forward_only else step.one_f_one_b()
