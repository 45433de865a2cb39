"""`mega`, a model of EleutherAI's lm-evaluation-harness: `lm_eval --model mega
--model_args run=RUN_DIR --tasks ...` scores a mega checkpoint.

The checkpoint (a run directory, a checkpoint directory or an archive) is opened with
`mega.checkpoint.restore` in this one process: a checkpoint trained at any tensor/pipeline
layout is gathered into the whole model, as `mega generate` does. Requests are scored the
way lm-eval's own Hugging Face backend (`hf`) scores a causal model, so the numbers are
the ones `--model hf` gives for the same GPT exported with `mega export --to huggingface`:

* loglikelihood: context and continuation tokenized together and split at the context's
  tokens (TemplateLM), an empty context conditioned on the end-of-document token; the
  sequence cut to the model's last `max_length + 1` tokens; log-softmax over the real
  vocabulary (mega's padding rows left out); batches of `batch_size` requests, longest
  first, right-padded (the attention is causal, so padding after a request never reaches it).
* loglikelihood_rolling: the text in disjoint windows of `max_length` tokens, each
  conditioned on what precedes it (lm-eval's rolling windows), summed.
* generate_until: greedy decoding (or sampling with `temperature`, `top_k`, `top_p` when
  a task sets `do_sample`) with a KV cache from the context's last `max_length -
  max_gen_toks` tokens, stopping at the end-of-document token, at `max_gen_toks` or at a
  stop string, which is cut off. Requests whose contexts have the same length run as one batch.

Model arguments: `run` (or `checkpoint`), `batch_size` (lm-eval's `--batch_size`; "auto" is
32), `device` (lm-eval's `--device`; default cuda when there is one), `dtype` (float32,
bfloat16, float16), `max_length` (default: the model's positions), `max_gen_toks` (256),
and `overrides` (config overrides for the checkpoint, separated by ";", e.g.
`overrides=model.attention_backend=torch`).
"""
from __future__ import annotations

import logging
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from lm_eval import utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

from mega.checkpoint import restore
from mega.errors import ConfigError
from mega.protocols import Generator

log = logging.getLogger("mega")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AUTO_BATCH = 32  # batch_size="auto": requests are short next to what a GPU holds
SAMPLING = ("do_sample", "temperature", "top_k", "top_p", "until", "max_gen_toks")


def _batch_size(value) -> int:
    if isinstance(value, str) and value.startswith("auto"):
        return AUTO_BATCH
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"batch_size={value!r}: expected a positive integer or auto") from None
    if size < 1:
        raise ConfigError(f"batch_size={value!r}: expected a positive integer or auto")
    return size


@register_model("mega")
class MegaLM(TemplateLM):
    """A mega checkpoint as an lm-eval model (see the module docstring)."""

    def __init__(self, run: Optional[str] = None, checkpoint: Optional[str] = None, batch_size=1,
                 max_batch_size=None, device: Optional[str] = None, dtype: str = "float32",
                 max_length: Optional[int] = None, max_gen_toks: int = 256, overrides: str = "", **unknown):
        super().__init__()
        if unknown:
            raise ConfigError(f"--model_args: unknown argument(s) {', '.join(sorted(unknown))} for --model mega (known: run,"
                              " batch_size, device, dtype, max_length, max_gen_toks, overrides)")
        path = run or checkpoint
        if not path:
            raise ConfigError("--model_args: give the checkpoint as run=RUN_DIR (a run directory, checkpoint or .mega archive)")
        if str(dtype) not in DTYPES:
            raise ConfigError(f"--model_args dtype={dtype!r}: expected one of {', '.join(DTYPES)}")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, tokenizer, config = restore(str(path), device=device,
                                           overrides=[o for o in str(overrides or "").split(";") if o])
        if not isinstance(model, Generator):
            raise ConfigError(f"{path}: model.name={config.model.name!r} is not a decoder that lm-eval can score"
                              " (mega.protocols.Generator: GPT-style models are)")
        self.model = model.to(DTYPES[str(dtype)])
        self.tokenizer = tokenizer
        self.config = config
        self._device = torch.device(device)
        self._batch = _batch_size(batch_size)
        self._max_length = int(max_length) if max_length else int(model.max_positions)
        self._max_gen_toks = int(max_gen_toks)
        self.vocab_size = int(model.vocab_size)

    # --- what lm-eval asks of a causal model -------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_id)

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return f"mega-{self.config.model.tokenizer.library}"

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, left_truncate_len: Optional[int] = None,
                   **kwargs) -> List[int]:
        ids = list(self.tokenizer.encode(string))
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = False) -> str:
        """Text of token ids; the end-of-document token never reaches a generation (it stops it)."""
        return self.tokenizer.decode([tokens] if isinstance(tokens, int) else list(tokens))

    def get_model_info(self) -> dict:
        return {"model_num_parameters": sum(p.numel() for p in self.model.parameters()),
                "model_dtype": str(next(self.model.parameters()).dtype), "model_name": self.config.model.name}

    @torch.no_grad()
    def _log_probs(self, inputs: torch.Tensor) -> torch.Tensor:
        """Log-probabilities [batch, seq, vocab] over the tokenizer's vocabulary."""
        logits = self.model(inputs.to(self.device))[..., : self.vocab_size]
        return F.log_softmax(logits.float(), dim=-1)

    # --- loglikelihood -----------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: Optional[int] = None
                              ) -> List[Tuple[float, bool]]:
        order = Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])))
        results = []
        for chunk in order.get_batched(n=override_bs or self.batch_size):
            rows, spans = [], []
            for _, context, continuation in chunk:
                if not context or not continuation:
                    raise ValueError("a loglikelihood request needs a context token and a continuation token")
                if len(continuation) > self.max_length:  # lm-eval's hf backend refuses it too
                    raise ConfigError(f"a continuation of {len(continuation)} tokens does not fit the model's"
                                      f" {self.max_length} positions (max_length)")
                row = (context + continuation)[-(self.max_length + 1):][:-1]
                rows.append(row)
                spans.append((len(row) - len(continuation), len(row), continuation))
            width = max(len(r) for r in rows)
            inputs = torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.long)
            log_probs = self._log_probs(inputs)
            for row_probs, (start, end, continuation) in zip(log_probs, spans):
                scored = row_probs[start:end]
                target = torch.tensor(continuation, device=scored.device)
                greedy = bool((scored.argmax(-1) == target).all())
                results.append((float(scored.gather(-1, target[:, None]).sum()), greedy))
        return order.get_original(results)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        windows, owners = [], []
        for index, (text,) in enumerate(req.args for req in requests):
            for window in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                    context_len=1)):
                windows.append((None, *window))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (log_prob, _) in zip(owners, self._loglikelihood_tokens(windows)):
            totals[owner] += log_prob
        return totals

    # --- generate_until ----------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        eos_text = self.tok_decode(self.eot_token_id)
        jobs = []
        for context, gen_kwargs in (req.args for req in requests):
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            unknown = sorted(set(kwargs) - set(SAMPLING))
            if unknown:
                raise ConfigError(f"generation_kwargs {', '.join(unknown)}: not supported by --model mega"
                                  f" (it takes {', '.join(SAMPLING)})")
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_new = int(kwargs.pop("max_gen_toks"))
            room = self.max_length - max_new
            if room <= 0:
                raise ConfigError(f"max_gen_toks={max_new} leaves no room for a context in the model's {self.max_length}"
                                  " positions")
            jobs.append((self.tok_encode(context, left_truncate_len=room), until, max_new, kwargs))
        out: List[Optional[str]] = [None] * len(jobs)
        groups: dict = {}
        for i, (ids, until, max_new, kwargs) in enumerate(jobs):  # one batch: same length, same settings
            groups.setdefault((len(ids), tuple(until), max_new, tuple(sorted(kwargs.items()))), []).append(i)
        for (_, until, max_new, kwargs), members in groups.items():
            for start in range(0, len(members), self.batch_size):
                batch = members[start:start + self.batch_size]
                generated = self._generate([jobs[i][0] for i in batch], list(until), max_new, dict(kwargs))
                for i, ids in zip(batch, generated):
                    out[i] = postprocess_generated_text(self.tok_decode(ids), list(until), None)
        return out

    @torch.no_grad()
    def _generate(self, contexts: List[List[int]], until: List[str], max_new: int, kwargs: dict) -> List[List[int]]:
        """Continue equally long `contexts` by up to `max_new` tokens each; a row stops at
        the end-of-document token (not kept) or once its text holds a stop string."""
        n, length = len(contexts), len(contexts[0])
        cache = self.model.new_kv_cache(n, length + max_new)
        step = torch.tensor(contexts, dtype=torch.long, device=self.device)
        generated: List[List[int]] = [[] for _ in range(n)]
        done = [False] * n
        gen = torch.Generator(device="cpu").manual_seed(1234)
        stops = [s for s in until if s]
        for _ in range(max_new):
            logits = self.model(step, cache=cache)[:, -1, : self.vocab_size].float()
            tokens = self._pick(logits, kwargs, gen)
            for row, token in enumerate(tokens):
                if done[row]:
                    continue
                if token == self.eot_token_id:
                    done[row] = True
                    continue
                generated[row].append(token)
                if stops and any(s in self.tok_decode(generated[row]) for s in stops):
                    done[row] = True
            if all(done):
                break
            step = torch.tensor([[t] for t in tokens], dtype=torch.long, device=self.device)
        return generated

    @staticmethod
    def _pick(logits: torch.Tensor, kwargs: dict, gen: torch.Generator) -> List[int]:
        if not kwargs.get("do_sample"):
            return logits.argmax(-1).tolist()
        logits = logits / max(float(kwargs.get("temperature") or 1.0), 1e-6)
        top_k = int(kwargs.get("top_k") or 0)
        if top_k > 0:
            kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        top_p = float(kwargs.get("top_p") or 1.0)
        if top_p < 1.0:
            ordered, index = torch.sort(logits, descending=True)
            probs = ordered.softmax(-1)
            ordered = ordered.masked_fill(probs.cumsum(-1) - probs >= top_p, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(-1, index, ordered)
        return torch.multinomial(logits.softmax(-1).cpu(), 1, generator=gen)[:, 0].tolist()
