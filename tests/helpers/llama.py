"""Tiny Llama, Mistral and Qwen2 models and tokenizers built on the spot (nothing is
downloaded), shared by the llama tests.

* Models: transformers' own classes from small configs that exercise every rule (8 query
  heads in 2 groups, head_dim apart from hidden/heads, llama3 and linear RoPE scaling,
  Qwen2's QKV bias, Mistral's window shorter than the sequence), eager attention, fp32,
  with the 1-D parameters randomised: HF starts norms at 1 and biases at 0, which would
  hide a swapped norm or a dropped bias.
* Tokenizers: a sentencepiece BPE with Llama 2's ids (<unk> 0, <s> 1, </s> 2, byte
  fallback) and `add_bos_token`; a Llama-3-style byte-level BPE `tokenizer.json`
  (TikToken-style split regex, `<|begin_of_text|>` put first by its post-processor); a
  Qwen2-style one (no BOS, `<|endoftext|>` ends).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional

import torch

from mega.testing import write_corpus

AWKWARD = [
    "the model reads a token",
    "  leading spaces, trailing spaces  ",
    "tabs\tand\nnew\n\nlines\r\n",
    "Ünïcödé ümlauts, 日本語のテキスト, emoji 🤖🚀 and ZWJ 👩\u200d💻",
    "it's they'll we've I'M don't 123 4567 3.14 $$$ ___ ...",
    "<|endoftext",
    "",
    " ",
    "\u00a0non-breaking\u2009thin\u3000ideographic",
    "a" * 300,
    "def f(x):\n    return x ** 2  # squares\t\t",  # runs of spaces: Llama 2's "▁▁▁" pieces
    "    ",
]
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
BASE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
            max_position_embeddings=64)
# name -> (transformers class name, config fields beyond BASE)
VARIANTS: Dict[str, tuple] = {
    "llama_gqa_llama3": ("Llama", dict(rope_theta=5e5, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16})),
    "llama_mha_tied": ("Llama", dict(num_key_value_heads=8, tie_word_embeddings=True)),
    "llama_mqa_headdim_linear_bias": ("Llama", dict(num_key_value_heads=1, head_dim=16, attention_bias=True,
                                                    mlp_bias=True, rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "qwen2_tied": ("Qwen2", dict(tie_word_embeddings=True, rope_theta=1e6, rms_norm_eps=1e-6)),
    "mistral_window": ("Mistral", dict(sliding_window=5, head_dim=16)),
}


def corpus_lines(directory: Path) -> list:
    return (write_corpus(directory / "corpus.txt", lines=200).read_text() + "\n".join(AWKWARD)).splitlines()


def sentencepiece_llama(directory: Path, vocab_size: int = 400) -> Path:
    """A BPE sentencepiece model with Llama 2's special ids, byte fallback and normaliser
    (identity, whitespace kept: what transformers' fast conversion assumes)."""
    import sentencepiece as spm

    directory.mkdir(parents=True, exist_ok=True)
    text = directory / "sp_corpus.txt"
    text.write_text("\n".join(corpus_lines(directory)) + "\n")
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(directory / "tokenizer"), vocab_size=vocab_size,
                                   model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   character_coverage=0.98, minloglevel=2, num_threads=1,
                                   # Llama 2's normaliser: text as it is, spaces kept, digits apart
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   split_digits=True, allow_whitespace_only_pieces=True)
    return directory / "tokenizer.model"


def byte_level_json(directory: Path, style: str = "llama3", vocab_size: int = 400) -> Path:
    """A byte-level BPE tokenizer.json: Llama 3's shape (split regex, ByteLevel without
    its own regex, `<|begin_of_text|> $A` post-processor) or Qwen2's (single digits, no BOS)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    directory.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(fuse_unk=False, ignore_merges=style == "llama3"))
    split = LLAMA3_SPLIT if style == "llama3" else QWEN2_SPLIT
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"] if style == "llama3" else \
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus_lines(directory), trainer)
    if style == "llama3":
        bos = tok.token_to_id(specials[0])
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{specials[0]} $A", pair=f"{specials[0]} $A {specials[0]} $B",
                                          special_tokens=[(specials[0], bos)])])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.save(str(directory / "tokenizer.json"))
    return directory / "tokenizer.json"


def randomised(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Norm weights ~ N(1, 0.1), biases ~ N(0, 0.1) (HF starts them at 1 and 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if "norm" in name else 0.0))
    return model.eval()


def hf_model(variant: str, vocab: int, seed: int = 0, **extra):
    """transformers' model of `variant` (VARIANTS) with `vocab` tokens."""
    import transformers

    family, fields = VARIANTS[variant]
    config_class = getattr(transformers, f"{family}Config")
    model_class = getattr(transformers, f"{family}ForCausalLM")
    torch.manual_seed(seed)
    config = config_class(vocab_size=vocab, **{**BASE, **fields, **extra}, bos_token_id=1, eos_token_id=2)
    config._attn_implementation = "eager"
    return randomised(model_class(config))


def save_directory(model, directory: Path, tokenizer: str, tokenizer_files: Path, **save) -> Path:
    """save_pretrained + the tokenizer's files: "sentencepiece" (tokenizer.model and a
    LlamaTokenizer config with add_bos_token), "llama3" or "qwen2" (tokenizer.json)."""
    model.save_pretrained(directory, **save)
    if tokenizer == "sentencepiece":
        (directory / "tokenizer.model").write_bytes(Path(tokenizer_files).read_bytes())
        config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
                  "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "legacy": True}
    else:
        (directory / "tokenizer.json").write_bytes(Path(tokenizer_files).read_bytes())
        config = {"tokenizer_class": "PreTrainedTokenizerFast"}
        config.update({"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"} if tokenizer == "llama3"
                      else {"bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"})
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def tokens(vocab: int, batch: int = 2, length: int = 19, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def max_logit_diff(mega_model, theirs, ids: torch.Tensor, vocab: Optional[int] = None) -> float:
    vocab = vocab or mega_model.vocab_size
    ours = mega_model(ids)[..., :vocab]
    other = theirs(ids).logits[..., :vocab]
    assert ours.shape == other.shape
    return float((ours - other).abs().max())
