"""The `text_mmap` dataset: raw text files, one document per line, memory-mapped.

For language models the documents are packed (`pack = true`, the default; see
`mega.plugins.data.packing`): each is tokenized once, with an end-of-document id, into a
cache in the run directory, and the split's documents are concatenated and cut into
seq_length + 1 windows. With `pack = false` each document is one sample instead: its
tokens plus end-of-document, truncated to seq_length + 1, right-padded with a loss mask.
For BERT (`BertObjective`) documents are cut into sentences (`sentence_split`, see
`sentences.py`) and grouped into Megatron-LM's sentence-pair samples (`bert_samples.py`).
Files are blended by `data_prefix` weights and split by `splits_string`.

Besides raw text, `data_prefix` may name JSONL (`.jsonl`, `.json`, `.ndjson`: the string
under `json_key` of each line's object is a document), gzip- or zstd-compressed text or
JSONL (`.gz`, `.zst`), Parquet files and directories `datasets.Dataset.save_to_disk` wrote
(the `json_key` column); these are turned once into a document file in the run directory
(`document_file.py`) and read like raw text from then on, so the same documents give the
same samples whichever form they came in.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
from attrs import define

import mega
from mega.config import DataConfig
from mega.errors import ConfigError, DataError
from mega.plugins.data.bert_samples import BertSamples
from mega.plugins.data.document_file import document_file
from mega.documents import needs_conversion
from mega.plugins.data.blending import BlendedDataset, parse_splits, split_ranges
from mega.plugins.data.objectives import (
    BertObjective,
    DenoisingObjective,
    bart_infilling,
    encoder_decoder_sample,
    noise_spans,
    t5_span_corruption,
    word_spans_to_tokens,
)
from mega.plugins.data.packing import DocumentSpan, PackedSamples
from mega.plugins.data.quickstart_corpus import write_pydoc_corpus
from mega.plugins.data.sentences import SENTENCE_SPLITS, TokenizedDocuments, read_documents
from mega.plugins.data.token_cache import tokenized
from mega.plugins.data.text_index import TextMemMapIndex
from mega.protocols import HasSpecialTokens, KnowsWordStarts, SampleObjective

SPLITS = {"train": 0, "valid": 1, "test": 2}


@define(kw_only=True)
class TextMemMapConfig(DataConfig):
    data_impl: str = "text_mmap"
    shuffle: bool = True  # shuffle documents each epoch (seeded by model.seed)
    pack: bool = True  # lm: concatenate documents (with end-of-document ids) into full windows; false: one padded sample per document
    masked_lm_prob: float = 0.15  # t5/bart: share of tokens hidden in noise spans
    mean_noise_span_length: float = 3.0  # t5/bart: mean length of a noise span
    whole_word_masking: bool = False  # t5/bart: noise spans cover whole words
    json_key: str = "text"  # JSONL, Parquet, saved datasets: the key (column) holding each document's text (Megatron's --json-keys)
    sentence_split: str = "auto"  # bert: "line" (a sentence per line, blank line between documents), "punctuation" (a document per line, cut after .!? before a capital or digit), "auto" (line when the file has blank lines)


class DocumentRange:
    """Documents [start, end) of an index, as a sequence."""

    def __init__(self, index: TextMemMapIndex, start: int, end: int):
        self.index, self.start, self.end = index, start, end

    def __len__(self) -> int:
        return self.end - self.start

    def __getitem__(self, i: int) -> str:
        return self.index[self.start + i]


class LMSamples:
    """Documents -> fixed-length next-token samples."""

    def __init__(self, docs, tokenizer, seq_length: int):
        self.docs, self.tokenizer, self.seq_length = docs, tokenizer, seq_length

    def __len__(self) -> int:
        return len(self.docs)

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        return lm_sample(self.tokenizer.encode(self.docs[i]) + [self.tokenizer.eos_id], self.seq_length, self.tokenizer.pad_id)


def lm_sample(ids: List[int], seq_length: int, pad_id: int) -> Dict[str, torch.Tensor]:
    ids = ids[: seq_length + 1]
    n = len(ids) - 1
    tokens = torch.full((seq_length,), pad_id, dtype=torch.long)
    labels = torch.full((seq_length,), pad_id, dtype=torch.long)
    mask = torch.zeros(seq_length, dtype=torch.float32)
    tokens[:n] = torch.tensor(ids[:-1])
    labels[:n] = torch.tensor(ids[1:])
    mask[:n] = 1.0
    return {"tokens": tokens, "labels": labels, "loss_mask": mask}


class EncoderDecoderSamples:
    """Documents -> T5 span-corruption or BART infilling samples."""

    def __init__(self, docs, tokenizer, seq_length: int, objective: DenoisingObjective, config, seed: int):
        self.docs, self.tok, self.objective, self.cfg, self.seed = docs, tokenizer, objective.name, config, seed
        self.seq_length, self.seq_length_dec = seq_length, objective.seq_length_dec or seq_length
        self.extra_ids = objective.extra_ids

    def __len__(self) -> int:
        return len(self.docs)

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        ids = self.tok.encode(self.docs[i])[: self.seq_length - 1]
        rng = np.random.default_rng([self.seed, i])
        if self.cfg.whole_word_masking:
            starts = [j for j, s in enumerate(self.tok.word_starts(ids)) if s or j == 0]
            spans = noise_spans(len(starts), self.cfg.masked_lm_prob, self.cfg.mean_noise_span_length, rng, self.extra_ids)
            spans = word_spans_to_tokens(spans, starts, len(ids))
        else:
            spans = noise_spans(len(ids), self.cfg.masked_lm_prob, self.cfg.mean_noise_span_length, rng, self.extra_ids)
        first_extra = self.tok.vocab_size
        if self.objective == "t5":
            enc, target = t5_span_corruption(ids, spans, first_extra, self.tok.eos_id)
        else:
            enc, target = bart_infilling(ids, spans, first_extra, self.tok.eos_id)
        return encoder_decoder_sample(enc, target, self.seq_length, self.seq_length_dec, self.tok.pad_id, self.tok.pad_id)


class TextMemMapSource:
    """The files of `data_prefix`, indexed, ready to be split and blended."""

    def __init__(self, config: TextMemMapConfig, run_dir: Optional[Path]):
        self.config = config
        self.cache_dir = Path(run_dir) / "data" if run_dir is not None else None
        prefix = list(config.data_prefix)
        if not prefix:
            if run_dir is None:
                raise ConfigError("model.data.data_prefix: empty, and there is no run directory for the quickstart corpus")
            prefix = [1.0, str(write_pydoc_corpus(Path(run_dir) / "data" / "pydoc_topics.txt"))]
        self.weights = [float(w) for w in prefix[::2]]
        self.paths = [Path(p).expanduser() for p in prefix[1::2]]
        self.indexes = [document_file(p, config.json_key, self.cache_dir) if needs_conversion(p) else TextMemMapIndex(p)
                        for p in self.paths]
        self.fractions = parse_splits(config.splits_string)
        self._tokenized: dict = {}

    def files(self) -> List[Path]:
        """Plain text of every document (a converted input's document file), to train a tokenizer on."""
        return [index.path for index in self.indexes]

    def _sentences(self, i: int, tokenizer) -> TokenizedDocuments:
        """File i's documents, cut into sentences and tokenized (once per file and tokenizer)."""
        key = (i, id(tokenizer))
        if key not in self._tokenized:
            self._tokenized[key] = TokenizedDocuments(read_documents(self.indexes[i], self.config.sentence_split), tokenizer)
        return self._tokenized[key]

    def _parts(self, split: str, tokenizer, seq_length: int, seed: int, objective: SampleObjective,
               num_samples: Optional[int] = None) -> tuple:
        """(each file's samples of `split`, their weights) for the model's objective. BERT
        maps hold `num_samples` (each file its share), or one epoch when None."""
        denoising = isinstance(objective, DenoisingObjective)
        bert = isinstance(objective, BertObjective)
        known = ("t5", "bart") if denoising else ("bert",) if bert else ("lm",)
        if objective.name not in known:
            raise ConfigError(f"model.name: text_mmap has no samples for the objective {objective.name!r} (lm, t5, bart, bert)")
        if denoising and self.config.whole_word_masking and not isinstance(tokenizer, KnowsWordStarts):
            raise ConfigError("model.data.whole_word_masking: the tokenizer cannot tell where words start")
        if bert:
            if self.config.sentence_split not in SENTENCE_SPLITS:
                raise ConfigError(f"model.data.sentence_split={self.config.sentence_split!r}: one of {', '.join(SENTENCE_SPLITS)}")
            if not isinstance(tokenizer, HasSpecialTokens) or not isinstance(tokenizer, KnowsWordStarts):
                raise ConfigError(f"model.tokenizer.library: BERT samples need [CLS]/[SEP]/[MASK] ids and word starts,"
                                  f" which {type(tokenizer).__name__} lacks; use the wordpiece tokenizer")
        parts, weights = [], []
        for i, (w, path, index) in enumerate(zip(self.weights, self.paths, self.indexes)):
            if bert:
                sentences = self._sentences(i, tokenizer)
                start, end = split_ranges(sentences.num_docs, self.fractions)[SPLITS[split]]
                if end > start:
                    # Megatron builds each file's map for its share of the samples, with the run's seed
                    share = num_samples
                    if num_samples is not None and len(self.paths) > 1:
                        share = math.ceil(w / sum(self.weights) * num_samples) + 1
                    try:
                        parts.append(BertSamples(sentences.subset(start, end), tokenizer, seq_length, share, seed,
                                                 objective, shuffle=self.config.shuffle))
                    except DataError as exc:
                        raise DataError(f"{path}, {split} split (documents {start} to {end - 1}): {exc}") from None
                    weights.append(w)
                continue
            start, end = split_ranges(len(index), self.fractions)[SPLITS[split]]
            if end > start:
                docs = DocumentRange(index, start, end)
                if not denoising and self.config.pack:
                    parts.append(PackedSamples(DocumentSpan(tokenized(index, tokenizer, self.cache_dir), start, end),
                                               seq_length, tokenizer.pad_id, seed + 101 * SPLITS[split] + 7919 * len(parts),
                                               shuffle=self.config.shuffle, name=f"the {split} split of {path}"))
                elif not denoising:
                    parts.append(LMSamples(docs, tokenizer, seq_length))
                else:
                    parts.append(EncoderDecoderSamples(docs, tokenizer, seq_length, objective, self.config,
                                                       seed + 31 * SPLITS[split] + 7 * len(parts)))
                weights.append(w)
        if not parts:
            raise ConfigError(
                f"model.data.splits_string: the {split} split of {', '.join(map(str, self.paths))} has no documents"
                f" ({self.config.splits_string!r}); give it a share or more data"
            )
        return parts, weights

    def dataset(self, split: str, tokenizer, seq_length: int, num_samples: int, seed: int,
                objective: SampleObjective = SampleObjective()) -> BlendedDataset:
        """Samples for the model's objective: "lm" (next token), a DenoisingObjective
        ("t5" span corruption, "bart" infilling), or a BertObjective ("bert")."""
        parts, weights = self._parts(split, tokenizer, seq_length, seed, objective, num_samples)
        # BERT maps are shuffled already (Megatron's order): sample k of the split is map row k
        shuffle = self.config.shuffle and not isinstance(objective, BertObjective)
        return BlendedDataset(parts, weights, num_samples, seed + 101 * SPLITS[split], shuffle=shuffle)

    def whole_split(self, split: str, tokenizer, seq_length: int, seed: int,
                    objective: SampleObjective = SampleObjective()) -> "Concatenated":
        """Every document of `split` once, file after file (mega.protocols.WholeSplit)."""
        return Concatenated(self._parts(split, tokenizer, seq_length, seed, objective)[0])


class Concatenated:
    """Datasets one after the other, as one sequence."""

    def __init__(self, parts):
        self.parts = list(parts)
        self.ends = np.cumsum([len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def __getitem__(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(i)
        part = int(np.searchsorted(self.ends, i, side="right"))
        return self.parts[part][i - (int(self.ends[part - 1]) if part else 0)]


@mega.hookimpl
def register_datasets(register):
    register("text_mmap", TextMemMapSource, config=TextMemMapConfig)
