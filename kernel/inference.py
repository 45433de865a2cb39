"""Sampling text with a KV cache (`mega generate`); the model comes from
`mega.checkpoint.restore`.

A model that supports generation is a `mega.protocols.Generator`: `forward(tokens,
cache=None) -> logits`, `new_kv_cache(batch, max_len)`, `vocab_size` (logits past it are
vocabulary padding) and `max_positions`.
"""
from __future__ import annotations

from typing import Collection, List, Mapping, Optional, Union

import torch


def _filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already reach top_p
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def check_sampling(max_new_tokens: int, *, greedy: bool = False, temperature: float = 1.0, top_k: int = 0,
                   top_p: float = 1.0, names: Optional[Mapping[str, str]] = None) -> None:
    """Raise a ValueError naming the first setting out of range (`names` maps a parameter
    to how the caller spells it, e.g. "top_p" -> "--top-p"): top_p is a probability mass
    in (0, 1] (at 0 no token would be left to sample), top_k a count (0: all tokens),
    temperature positive unless greedy."""
    name = dict(names or {}).get
    if max_new_tokens < 0:
        raise ValueError(f"{name('max_new_tokens', 'max_new_tokens')}: must be >= 0, got {max_new_tokens}")
    if not 0 < top_p <= 1:
        raise ValueError(f"{name('top_p', 'top_p')}: must be in (0, 1] (the probability mass sampled from; 1: all"
                         f" tokens), got {top_p:g}")
    if top_k < 0:
        raise ValueError(f"{name('top_k', 'top_k')}: must be >= 0 (0: all tokens), got {top_k}")
    if not greedy and not temperature > 0:
        raise ValueError(f"{name('temperature', 'temperature')}: must be positive (or use greedy), got {temperature:g}")


@torch.no_grad()
def generate(model, prompt: List[int], max_new_tokens: int, *, greedy: bool = False, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, eos_id: Union[None, int, Collection[int]] = None,
             seed: Optional[int] = None, use_cache: bool = True) -> List[int]:
    """Continue `prompt` (token ids) by up to `max_new_tokens` tokens; stops at `eos_id`
    (one id, or a set of them: Llama 3.1's instruct models end a turn with any of three).

    greedy picks the arg-max; otherwise sampling at `temperature`, restricted to the `top_k`
    most likely tokens (0: all) and to the smallest set whose probability reaches `top_p`.
    With `use_cache` each new token costs one position of attention (a KV cache); without,
    the whole sequence is recomputed each time (same result, used to test the cache).
    """
    if not prompt:
        raise ValueError("the prompt is empty")
    check_sampling(max_new_tokens, greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p)
    device = next(model.parameters()).device
    total = min(len(prompt) + max_new_tokens, model.max_positions)
    if len(prompt) >= model.max_positions:
        raise ValueError(f"the prompt has {len(prompt)} tokens; the model holds {model.max_positions} positions")
    gen = torch.Generator(device="cpu")
    gen.manual_seed(0 if seed is None else seed)
    tokens = list(prompt)
    stop = set() if eos_id is None else {eos_id} if isinstance(eos_id, int) else set(eos_id)
    cache = model.new_kv_cache(1, total) if use_cache else None
    step_input = torch.tensor([tokens], device=device)
    while len(tokens) < total:
        logits = model(step_input if use_cache else torch.tensor([tokens], device=device), cache=cache)[0, -1].float()
        logits[model.vocab_size:] = float("-inf")  # vocabulary padding
        if greedy:
            nxt = int(torch.argmax(logits))
        else:
            probs = _filter_logits(logits / temperature, top_k, top_p).softmax(-1).cpu()
            nxt = int(torch.multinomial(probs, 1, generator=gen))
        tokens.append(nxt)
        if nxt in stop:
            break
        step_input = torch.tensor([[nxt]], device=device)
    return tokens[len(prompt):]
