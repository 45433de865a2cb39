"""What the kernel calls on a plugin's objects, declared once.

Registration hooks hand the kernel factories; the objects those factories return are
used only through the protocols below (structural types: a plugin implements the
methods, it never subclasses anything). Hook docstrings and `docs/plugins.md` point here,
so this file is the one place a contract is written down.

Required behaviour is a `Protocol`; an optional ability is a small `runtime_checkable`
protocol of its own that the kernel tests with `isinstance` (a model that can count its
FLOPs, a checkpoint format that names its directories, a tokenizer that knows where words
start). Checking one is cheap: it looks up attribute names, nothing is called.
"""
from __future__ import annotations

from enum import IntEnum
from pathlib import Path
from typing import (TYPE_CHECKING, Callable, Dict, List, Mapping, Optional, Protocol, Sequence, Tuple, TypedDict, Union,
                    runtime_checkable)

import attrs

if TYPE_CHECKING:  # the config layer imports this module; it stays free of torch
    import torch

Batch = Dict[str, "torch.Tensor"]


class LossOutput(TypedDict, total=False):
    """What a model returns for one micro-batch. `loss_sum` is the *sum* of its masked
    token losses: the kernel divides by the token count (`loss_mask` ones) of the whole
    global batch, so micro-batching and data parallelism never change the numbers. `terms`
    are extra values to log, summed the same way (each is reported per token of the
    global batch).

    `sample_loss_sum` is the sum of per-sample losses (a sentence-level head: BERT's
    next-sentence/sentence-order loss, a classifier), divided by the sample count of the
    whole global batch; the step's loss is the sum of both means. `sample_terms` are logged
    per sample the same way (e.g. an accuracy: the micro-batch's count of right answers).
    At least one of the two sums is required; a model whose batches carry no `loss_mask`
    returns only `sample_loss_sum`."""

    loss_sum: torch.Tensor
    terms: Dict[str, torch.Tensor]
    sample_loss_sum: torch.Tensor
    sample_terms: Dict[str, torch.Tensor]


def missing_members(obj, proto: type) -> List[str]:
    """The members of `proto` that `obj` lacks (empty when it satisfies the protocol), so
    an error can say what a plugin's object is missing instead of failing mid-run."""
    names = set(getattr(proto, "__annotations__", {})) | {n for n in vars(proto) if not n.startswith("_")}
    return sorted(n for n in names if not hasattr(obj, n))


# --- models ---------------------------------------------------------------------------------


@runtime_checkable
class LanguageModel(Protocol):
    """Every model a `register_models` factory returns: an `nn.Module` the loop trains."""

    def training_loss(self, batch: Batch) -> LossOutput:
        """Loss of one micro-batch (a sample dict from the data source, on the device)."""


@runtime_checkable
class CountsFlops(Protocol):
    """Optional: lets the loop report TFLOP/s and MFU, and says which count it uses."""

    def flops_per_token(self, seq_length: int) -> float:
        """Training FLOPs (forward + backward) per token at this sequence length."""


@runtime_checkable
class PipelineStage(Protocol):
    """A model that runs under pipeline parallelism (`model.pipeline_model_parallel_size > 1`).
    Built on each stage with only that stage's layers (the factory reads
    `mega.runtime.parallel.current()`)."""

    pipeline_layer_offset: int  # global index of this stage's first layer (resharding renames by it)
    state_aliases: Mapping[str, str]  # state-dict names that are copies of another (the tied head)

    def stage_forward(self, batch: Batch, hidden: Optional[torch.Tensor]) -> Union[torch.Tensor, LossOutput]:
        """First stage: embed `batch` (ignore `hidden`); middle stages: return hidden
        states; the last stage returns the `LossOutput` of `training_loss`."""

    def activation_shape(self, batch: Batch) -> Tuple[int, ...]:
        """Shape of the hidden states sent between stages for this micro-batch."""

    def shared_embedding_or_output_weight(self) -> torch.Tensor:
        """The word embedding (first stage) or its tied copy in the output layer (last
        stage): the kernel sums their gradients over the two stages. A model whose output
        layer is a matrix of its own says `share_embeddings_and_output_weights = False`
        (megatron-core's attribute; true when absent) and nothing is summed."""


@runtime_checkable
class Generator(Protocol):
    """A decoder that `mega generate` samples from with a KV cache."""

    vocab_size: int  # the tokenizer's; logits past it are vocabulary padding
    max_positions: int

    def __call__(self, tokens: torch.Tensor, cache=None) -> torch.Tensor:
        """Logits [batch, seq, padded vocab] for the new `tokens`, appending to `cache`."""

    def new_kv_cache(self, batch: int, max_len: int):
        """An empty cache for `batch` sequences of up to `max_len` positions."""


@runtime_checkable
class EncoderDecoder(Protocol):
    """A model with an encoder `mega encode` can run and a decoder `mega generate` can
    drive from the encoder's output (T5, BART, MIM/VAE)."""

    vocab_size: int

    def encode(self, text_enc: torch.Tensor, enc_mask: torch.Tensor, batch_data: Optional[Batch] = None) -> Dict[str, torch.Tensor]:
        """Named encoder outputs (`hiddens`, `hiddens_mask`, `enc_output`, hiddens outputs)."""

    def greedy_decode(self, text_enc: torch.Tensor, enc_mask: torch.Tensor, bos_id: int, eos_id: int,
                      max_len: int) -> torch.Tensor:
        """Token ids [batch, <= max_len], starting with `bos_id`."""


@runtime_checkable
class StatefulModel(Protocol):
    """A model that carries state from one global batch to the next (Transformer-XL's
    memory). The state is per rank, never back-propagated through (detach it), and saved
    in every checkpoint with the trainer state, so a resumed run continues bit for bit."""

    def carried_state(self) -> Dict[str, torch.Tensor]:
        """This rank's state after the last step (tensors; empty before the first)."""

    def load_carried_state(self, state: Dict[str, torch.Tensor]) -> None:
        """Restore what `carried_state` returned (on resume)."""


@runtime_checkable
class SparselyReached(Protocol):
    """Optional: a model some of whose parameters a training step may not reach
    (Transformer-XL's adaptive-input and adaptive-softmax buckets that no token of the step
    falls in). It may still give them zero gradients, so that DDP sees every parameter;
    after each step's backward the kernel asks which were reached, on any data-parallel
    rank, and drops the gradients of the others before clipping and the optimizer step. A
    tensor no step reached therefore keeps its weights and optimizer state, as in plain
    PyTorch, where its `.grad` stays None and optimizers skip it (a zero gradient would
    still move it by momentum)."""

    def sparse_parameters(self) -> List["torch.nn.Parameter"]:
        """The parameters a step may not reach, in the same order on every rank."""

    def take_reached(self) -> List[object]:
        """For each of `sparse_parameters()`, whether a forward with gradients reached it
        since the last call: a Python bool, or a 0-dim boolean tensor on the device (so the
        forward need not read its data to know); the record then starts afresh. True for
        all when nothing was recorded (nothing is dropped then)."""


@runtime_checkable
class Evaluates(Protocol):
    """Optional: a model (or, later, a task) that evaluates a split its own way, which
    `mega evaluate` then calls instead of its token-loss pass: Transformer-XL carries its
    memory across segments at its own evaluation lengths; downstream tasks report exact
    match, F1 or accuracy. The model is built at this process's parallel layout
    (`mega.runtime.parallel.current()`), loaded and in eval mode; `config` is the
    ExperimentConfig with the command line's overrides applied."""

    def evaluate(self, source: "DataSource", split: str, tokenizer: "Tokenizer", config) -> Dict[str, float]:
        """Metrics over the whole `split` ("valid", "test") of `source`. Called on every
        rank (a collective) under `torch.no_grad()`; return the same dict everywhere.
        Report `loss` (mean token loss, nats) when there is one: `mega evaluate` adds
        `perplexity` from it. A model that can score through its TorchScript module also
        takes a keyword `torchscript: bool = False` (`mega evaluate --torchscript`)."""


@runtime_checkable
class ValidationMetrics(Protocol):
    """Optional: metrics a model reports at each validation of a training run besides its
    loss (a fine-tuned task's accuracy, F1 or exact match), which the loop logs as
    `val_<name>` beside `val_loss` to every logger."""

    def validation_metrics(self, run) -> Dict[str, float]:
        """Metrics over the run's validation samples, the same ones at every validation
        (so values compare across steps). Called on every rank (a collective) under
        `torch.no_grad()` with the model in eval mode, after the loss pass; return the same
        dict everywhere. Keep it cheap and write no files: it runs every
        `trainer.val_check_interval` steps. `run` has `config`, `tokenizer`, `parallel`,
        `device` and `valid_data`."""


# --- what a model trains on ------------------------------------------------------------------


@attrs.frozen
class SampleObjective:
    """Which samples a model trains on, declared by its config (`ModelConfig.objective()`)
    and handed unchanged to the data source. "lm" is next-token prediction; a model plugin
    that needs other samples returns a subclass with the options its data needs (e.g.
    span corruption's decoder length), and data sources refuse objectives they don't know."""

    name: str = "lm"


@runtime_checkable
class DeclaresObjective(Protocol):
    """Optional for a built model: the samples it trains on, when they come from an object
    the model holds rather than from its config alone (a fine-tuning task's model holds the
    task that reads the task's files). The kernel asks the model first, then
    `config.objective()` (`mega.training.run.objective_of`)."""

    def objective(self) -> SampleObjective: ...


# --- components the kernel drives ----------------------------------------------------------


@runtime_checkable
class Tokenizer(Protocol):
    vocab_size: int  # ids are 0 .. vocab_size - 1
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> List[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def artifacts(self) -> Dict[str, Path]:
        """Config keys whose files belong in a checkpoint (e.g. {"model": <.model path>});
        the kernel copies them and points the saved config at the copies."""


@runtime_checkable
class KnowsWordStarts(Protocol):
    """Optional: whole-word masking needs to know which ids begin a word."""

    def word_starts(self, ids: Sequence[int]) -> List[bool]: ...


@runtime_checkable
class HasSpecialTokens(Protocol):
    """Optional: what BERT-style samples need from a tokenizer (WordPiece vocabularies
    have them): the ids of `[CLS]`, `[SEP]` and `[MASK]` (`pad_id` is the Tokenizer's)."""

    cls_id: int
    sep_id: int
    mask_id: int


@runtime_checkable
class DataSource(Protocol):
    """What a `register_datasets` factory returns: the files of `model.data`, ready to be cut."""

    def files(self) -> List[Path]:
        """Text a tokenizer may train on."""

    def dataset(self, split: str, tokenizer: Tokenizer, seq_length: int, num_samples: int, seed: int,
                objective: SampleObjective = SampleObjective()) -> Sequence[Batch]:
        """`num_samples` sample dicts of `split` ("train", "valid", "test"); sample `i` is a
        pure function of `i` and `seed` (resume relies on it)."""


@runtime_checkable
class WholeSplit(Protocol):
    """Optional for a data source: every sample of a split exactly once, in a fixed order
    (no epochs, shuffling or blending weights), which `mega evaluate` scores in full."""

    def whole_split(self, split: str, tokenizer: Tokenizer, seq_length: int, seed: int,
                    objective: SampleObjective = SampleObjective()) -> Sequence[Batch]:
        """The samples of `split`, as `dataset` cuts them, each once."""


@runtime_checkable
class WritesDocuments(Protocol):
    """Optional, on a `register_datasets` factory (the class or function registered):
    `mega preprocess --data-impl NAME` tokenizes text into this data source's own files."""

    def document_writer(self, prefix: Path, vocab_size: int):
        """A writer of the files `model.data.data_prefix = PREFIX` then reads, for ids below
        `vocab_size`: `add_document(ids)` once per document in order, `finalize() -> Path`
        (the files appear only then, whole) and `abort()` (removes what was written)."""


@runtime_checkable
class CheckpointFormat(Protocol):
    """An on-disk layout. The kernel owns atomicity, checksums, `latest` and pruning;
    a format only writes and reads this rank's files inside `directory`."""

    name: str  # recorded in the manifest, so a checkpoint is loaded by its own format

    def save(self, state: dict, directory: Path, parallel=None) -> None:
        """Write this model-parallel rank's part (`parallel`: its ParallelState, None for
        one process) of `state`: `model`, `optimizer`, `trainer`, `sharding`, `config`."""

    def load(self, directory: Path, parallel=None, parts: Sequence[str] = ("model", "optimizer", "trainer", "sharding")) -> dict:
        """This rank's part, as `save` received it (at least `model`)."""


@runtime_checkable
class NamesDirectories(Protocol):
    """Optional: a format's own directory names (Megatron-LM's `iter_XXXXXXX`)."""

    def directory_name(self, step: int) -> str: ...


@runtime_checkable
class ReshardsItself(Protocol):
    """Optional: a format whose ranks each read only their own slices at any parallel layout
    (e.g. torch.distributed.checkpoint); `load_resharded` asks it directly instead of merging
    every saved rank's tensors in one process."""

    def load_resharded(self, directory: Path, parallel, model, optimizer=None) -> dict:
        """This rank's state for `model` (built at the current layout): `model`, and
        `optimizer` and `trainer` where saved (RNG states need not carry across layouts)."""


@runtime_checkable
class SavesOptimizerShards(Protocol):
    """Optional: a format that stores a distributed optimizer's state as each data-parallel
    rank holds it (Megatron's `dp_reshardable` bucket space: no gather, no rank holds more
    than its shard). Under `model.optim.use_distributed_optimizer` the kernel then puts
    this rank's `mega.runtime.bucket_space.OptimizerShards` in the state's `optimizer` and
    calls `save` on EVERY rank, not only on data-parallel replica 0: the format writes the
    model and trainer parts on replica 0 and each rank's shards everywhere. Reading, it may
    hand back a `mega.runtime.bucket_space.BucketSpace` as `optimizer`."""

    saves_optimizer_shards: bool


@runtime_checkable
class CommitHook(Protocol):
    """Optional: runs once a checkpoint directory is in place (Megatron's tracker file)."""

    def after_commit(self, root: Path, final: Path, step: int) -> None: ...


@runtime_checkable
class Importer(Protocol):
    """Optional for a checkpoint format: `mega import SOURCE RUN_DIR` turns another tool's
    files (a Hugging Face model directory, a Megatron-LM checkpoint, an archive) into a mega
    run directory that `mega generate` and `mega run` open directly. Write it with
    `mega.checkpoint.write_imported_run`."""

    def can_import(self, source: Path) -> bool:
        """Whether `source` is in this format (cheap: look at file names, not weights)."""

    def import_run(self, source: Path, run_dir: Path, options: Mapping[str, str], plugins) -> Path:
        """Write the run directory; return the checkpoint written. `options` are the
        command line's `--option key=value` pairs (e.g. tokenizer files)."""


@runtime_checkable
class Exporter(Protocol):
    """Optional for a checkpoint format: `mega export RUN DEST --to NAME` writes a mega
    checkpoint in this format. Read it with `mega.checkpoint.restore`."""

    def export_run(self, checkpoint: Path, destination: Path, options: Mapping[str, str], plugins) -> Path:
        """Write `destination`; return it."""


@runtime_checkable
class Unpacks(Protocol):
    """Optional for an Importer of one-file checkpoints (archives): unpack into an ordinary
    checkpoint directory, so `mega generate FILE` reads it without importing a run."""

    def unpack(self, source: Path, directory: Path) -> Path:
        """Write the checkpoint directory under `directory`; return it."""


# --- converters: a model family's and a tokenizer's mapping to other tools' files ---------------
#
# The `huggingface`, `megatron`, `nemo` and `torch_dist` checkpoint formats read and write
# files; what the tensors, config keys and tokenizer files of one model family or one
# tokenizer are called in another tool is declared next to that family or tokenizer and
# registered with `register_model_converters` (by mega model name) and
# `register_tokenizer_converters` (by tokenizer library). A format asks the registries,
# so it names no family and no tokenizer, and a new family brings its own interop (the
# shape of torchtitan's per-model `StateDictAdapter`, whose model owns its `to_hf`/`from_hf`).
#
# A converter object implements the abilities below it has; each is optional and tested
# with `isinstance`. Tensors cross in mega's global names at one process (tensor and
# pipeline parallel merged) and in the other tool's names as its files hold them.

TokenizerFiles = Tuple[Dict[str, object], Dict[str, Path]]  # (mega's model.tokenizer table, {config key: file})


class Match(IntEnum):
    """How sure a converter is that a file holds its family (`megatron_recognises`,
    `nemo_recognises`): a format picks the surest, and refuses a tie."""

    NO = 0  # not this family
    FITS = 1  # the tensors (or keys) are ones this family has; nothing says it is another
    MARKED = 2  # the file carries something only this family has (a head, a class name, its tokenizer type)


@runtime_checkable
class HuggingFaceModelConverter(Protocol):
    """Optional on a model converter: Hugging Face transformers model directories
    (`config.json` and weights) of this family, for `mega import` and `mega export --to
    huggingface`. The format reads and writes the files (safetensors, `.bin`, shards,
    atomic directories); this maps config.json and the state dict."""

    hf_model_types: Sequence[str]  # config.json `model_type`s it reads (e.g. "gpt2")
    hf_architectures: Sequence[str]  # the transformers classes it writes, named in messages

    def hf_model_table(self, hf_config: dict, where: str) -> dict:
        """mega's `model` table (with `name`; the format adds the tokenizer,
        `seq_length` and `make_vocab_size_divisible_by` options) for `hf_config`, the
        parsed config.json; refuse what the family computes differently with a
        CheckpointError naming `where` and the config.json field."""

    def from_hf(self, hf_state: Mapping[str, "torch.Tensor"], model: dict, vocab_size: int,
                where: str) -> Dict[str, "torch.Tensor"]:
        """The transformers state dict -> mega's tensors for `model` (the table above,
        completed): vocabulary-sized tensors fitted from the tokenizer's `vocab_size` rows
        to the family's padded vocabulary. Refuse unknown or missing tensors by name."""

    def hf_config(self, model_config, tokenizer: Tokenizer, dtype: str) -> dict:
        """config.json for the run's `model` config (its vocabulary the tokenizer's,
        `torch_dtype` = `dtype`); refuse what transformers' class cannot compute."""

    def to_hf(self, state: Mapping[str, "torch.Tensor"], model_config, vocab_size: int) -> Dict[str, "torch.Tensor"]:
        """mega's tensors (one process) -> the transformers class's, cut to the
        tokenizer's `vocab_size`; refuse, by name, a tensor the class cannot hold."""


@runtime_checkable
class MegatronModelConverter(Protocol):
    """Optional on a model converter: Megatron-LM's legacy checkpoints of this family
    (`mega import`, `mega export --to megatron`, and the `megatron` training format's
    `args`). The format owns the files (iter_/mp_rank_ folders, safe unpickling, merging
    and splitting tensor/pipeline shards, the tokenizer and vocabulary fields of `args`);
    mega's names are Megatron-LM's legacy ones, so tensors need no renaming here."""

    vocab_tensors: Sequence[str]  # tensors whose first dimension is the padded vocabulary

    def megatron_recognises(self, state: Mapping[str, "torch.Tensor"], args) -> Match:
        """Whether a checkpoint (its tensors merged under mega's names, and its `args`,
        possibly None) is of this family. Asked only when `args.mega_model` does not name
        a model (files mega writes say it)."""

    def megatron_check(self, state: Mapping[str, "torch.Tensor"], args, where: str) -> None:
        """Refuse with a CheckpointError naming the `args` field or tensor what this family
        would compute differently (an MLP, a normalization, an untied output layer)."""

    def megatron_model_table(self, state: Mapping[str, "torch.Tensor"], args, where: str) -> dict:
        """mega's `model` table (with `name`; the format adds the tokenizer and the
        vocabulary padding) for the merged tensors and `args`."""

    def megatron_args(self, model: dict) -> dict:
        """The `args` fields Megatron-LM keeps for this family's architecture, for the
        `model` table of a run (a plain dict); the format adds the vocabulary, tokenizer,
        parallel layout and training fields."""


@runtime_checkable
class ChecksMegatronResume(Protocol):
    """Optional on a `MegatronModelConverter`: what a training run resumed from a
    `megatron` checkpoint must agree with that the weights cannot show (an activation
    both GELUs load into)."""

    def megatron_check_resume(self, args, model_config, where: str) -> None:
        """Raise a ConfigError naming the config key when the run's `model` config
        differs from what the checkpoint's `args` say it was trained with."""


@runtime_checkable
class MegatronCoreNames(Protocol):
    """Optional on a model converter: megatron-core's state-dict keys for this family's
    tensors (the `torch_dist` format, NeMo's mcore archives). Both ways; a name the
    family does not know is returned unchanged."""

    def mcore_name(self, name: str) -> str:
        """mega's global name -> megatron-core's key."""

    def mega_name(self, key: str) -> str:
        """megatron-core's key -> mega's global name."""


@runtime_checkable
class NemoModelConverter(Protocol):
    """Optional on a model converter: NeMo 1.x `.nemo` archives of this family (`mega
    import`). The format owns the tar, the rank members, merging the shards and the
    tokenizer files."""

    def nemo_recognises(self, nemo_config: dict) -> Match:
        """Whether `model_config.yaml` (parsed) is of this family (e.g. by its `target`)."""

    def nemo_model_table(self, nemo_config: dict, where: str) -> dict:
        """mega's `model` table (with `name`, no tokenizer); refuse what the family cannot
        run with a CheckpointError naming `where` and the yaml key."""

    def nemo_mega_name(self, name: str) -> Optional[str]:
        """A weight's name (without NeMo's `model.` prefix) under mega's names; None for a
        tensor that is not a weight of its own (the last stage's tied copy)."""


@runtime_checkable
class NemoArchiveReader(Protocol):
    """Optional on a `NemoModelConverter`: a family whose model_config.yaml leaves part of
    the model to other members of the archive (NeMo 1.x NLP task models keep the encoder's
    architecture in a JSON artifact named by `language_model.config_file`)."""

    def nemo_model_table_from(self, nemo_config: dict, artifact: Callable[[str], Optional[bytes]], where: str) -> dict:
        """As `nemo_model_table`; `artifact(key)` is the content of the archive member the
        dotted yaml key names (`nemo:<uuid>_<name>`), None when the key is unset (a member
        named but absent is the format's error, naming the key)."""


@runtime_checkable
class NemoModelExporter(Protocol):
    """Optional on a model converter: `mega export RUN model.nemo --to nemo` writes the
    archive NeMo's class restores (`restore_from`). The format writes the tar, one
    `mp_rank_XX/model_weights.ckpt` per tensor-parallel rank (split along each tensor's
    own split dimension), the tokenizer's files and the family's other members; the family
    says the yaml, NeMo's names and the vocabulary padding."""

    nemo_tokenizer_style: str  # "megatron" (library/type/model/vocab_file/merge_file) or "nlp" (tokenizer_name/vocab_file)
    nemo_gzip: bool  # gzip the tar by default (NeMo before 1.7 opens gzipped archives only)

    def nemo_config(self, model_config, tokenizer_section: dict, tp: int) -> dict:
        """model_config.yaml for the run's `model` config at tensor-parallel size `tp`,
        `tokenizer_section` (files already `nemo:` names) placed where the class reads it;
        what NeMo's class cannot express is a ConfigError naming mega's key."""

    def nemo_names(self, name: str, model_config) -> Sequence[str]:
        """NeMo's state-dict keys of mega's tensor `name`: none (NeMo has no such tensor),
        one, or several (a module NeMo's class registers twice, e.g. a shared embedding)."""

    def nemo_vocab_rows(self, model_config, tokenizer, tp: int) -> int:
        """The rows of the vocabulary-sized tensors (`vocab_tensors`) NeMo's class builds at
        tensor-parallel size `tp` (its own padding rule)."""

    def nemo_artifacts(self, model_config, tp: int) -> Dict[str, Tuple[str, bytes]]:
        """Members besides the weights and the tokenizer's files, by the dotted yaml key that
        names them: {key: (file name, content)}. The format stores each as
        `<hash>_<file name>` and sets the key to `nemo:` that name, as NeMo's save does."""


@runtime_checkable
class NemoSplitDims(Protocol):
    """Optional on a NeMo converter: tensors NeMo splits across tensor-parallel ranks where
    mega keeps them whole (or along another dimension), e.g. a ColumnParallelLinear of
    NeMo's that is a plain Linear in mega."""

    def nemo_split_dims(self, model_config) -> Dict[str, Optional[int]]:
        """{mega name: the dimension NeMo's ranks split it along (None: whole on each)}."""


@runtime_checkable
class HuggingFaceTokenizerConverter(Protocol):
    """Optional on a tokenizer converter: its files in a Hugging Face model directory."""

    hf_options: Sequence[str]  # `mega import --option` keys it reads
    hf_hint: str  # how to name its files with options, for the error when none is found
    file_names: Mapping[str, str]  # config key -> the file name it gets in an exported directory

    def from_hf(self, source: Path, options: Mapping[str, str], hf_config: dict,
                only_options: bool) -> Optional[TokenizerFiles]:
        """The tokenizer table and files of the model directory `source` (`hf_config` its
        parsed config.json): from the files `options` name when they name this tokenizer's;
        else, unless `only_options`, from the directory's own files; None when neither is
        this tokenizer's. The format asks every candidate with `only_options` first, so a
        file named on the command line wins over one in the directory."""

    def to_hf(self, tokenizer: Tokenizer, tokenizer_config, destination: Path, model_max_length: int) -> None:
        """Write files `transformers.AutoTokenizer.from_pretrained(destination)` loads,
        giving this tokenizer's ids."""


@runtime_checkable
class MegatronTokenizerConverter(Protocol):
    """Optional on a tokenizer converter: Megatron-LM's `tokenizer_type` and file fields
    of `args`, both ways."""

    megatron_options: Sequence[str]  # `mega import --option` keys it reads
    megatron_hint: str  # how to name its files with options, for the error when none is found
    file_names: Mapping[str, str]  # config key -> the file name it gets in an exported directory

    def megatron_files(self, tokenizer_table: dict) -> Dict[str, str]:
        """The config keys naming its files, and their values, in a run's tokenizer table
        (as `artifacts()` will name them: a model trained into the run directory too)."""

    def megatron_fields(self, tokenizer_table: dict, vocab_size: Optional[int], files: Mapping[str, str]) -> dict:
        """`tokenizer_type` and the file fields Megatron-LM's tokenizer reads (`files`:
        where its files are, by config key), and anything mega needs to read it back."""

    def from_megatron(self, args, options: Mapping[str, str], locate: Callable[[object], Optional[Path]],
                      only_options: bool) -> Optional[TokenizerFiles]:
        """The tokenizer table and files of a checkpoint whose `args` are given: from the
        files `options` name when they name this tokenizer's; else, unless `only_options`,
        when `args` say it is this tokenizer and its files are found (`locate(value)`: the
        file an `args` path names, where it was or beside the checkpoint); None otherwise.
        Asked with `only_options` first, as `from_hf`."""


@runtime_checkable
class NemoTokenizerConverter(Protocol):
    """Optional on a tokenizer converter: NeMo's `tokenizer` section of model_config.yaml."""

    nemo_hint: str  # what it reads, for the error when no tokenizer converter does

    def from_nemo(self, tokenizer_config: dict) -> Optional[Dict[str, str]]:
        """{mega config key: the yaml key whose value names the archive member} when the
        section is this tokenizer's (by NeMo's `library` and `type`), else None."""


@runtime_checkable
class NemoTokenizerTable(Protocol):
    """Optional on a `NemoTokenizerConverter`: what the yaml's section says beyond the files."""

    def nemo_table(self, tokenizer_config: dict) -> Dict[str, object]:
        """mega's tokenizer keys (besides `library` and the files) the section fixes, e.g.
        the lower-casing a NeMo `tokenizer_name` implies."""


@runtime_checkable
class NemoTokenizerExporter(Protocol):
    """Optional on a tokenizer converter: its section of a `.nemo` model_config.yaml."""

    def to_nemo(self, tokenizer_table: dict, style: str) -> Optional[Tuple[Dict[str, object], Dict[str, str]]]:
        """(NeMo's `tokenizer` section in `style` -- "megatron": `library`, `type`, `model`,
        `vocab_file`, `merge_file` (Megatron GPT/BERT/T5 models); "nlp": `tokenizer_name`,
        `vocab_file`, `tokenizer_model`, `special_tokens` (NeMo's NLP task models) -- with
        the file keys left for the format; {yaml key: mega config key of the file it names});
        None when NeMo's classes of that style cannot read this tokenizer."""


# --- downstream tasks ---------------------------------------------------------------------------


@runtime_checkable
class Task(Protocol):
    """What a `register_tasks` factory returns: a fine-tuning recipe on top of a head model
    (question answering, text or token classification, ...). `factory(config) -> Task`,
    `config` being the run's `model` table (a `ModelConfig` subclass with the task's keys);
    the task's name is also a model name (the kernel adds it) whose factory builds the task
    and returns its `model(tokenizer, plugins)`.

    A task reads its files into samples for the head, and turns the head's outputs back
    into the metrics people publish and into answers for `mega predict`."""

    head: str  # the registered model name of the head it fine-tunes (e.g. "bert_question_answering")

    def model(self, tokenizer: Tokenizer, plugins) -> "torch.nn.Module":
        """The model `model.name = "<task>"` trains: `head` (built with `head_options()`)
        holding this task object, so its data (`DeclaresObjective`), validation metrics,
        `mega evaluate` and `mega predict` all read this one task."""

    def check(self) -> None:
        """Raise a ConfigError naming the key for what is wrong before anything runs; may
        record what the data decides (a label map) into the config, so checkpoints carry it."""

    def head_options(self) -> Dict[str, object]:
        """Head config keys the task fixes (e.g. {"num_labels": 9})."""

    def samples(self, split: str, tokenizer: Tokenizer) -> Sequence[Batch]:
        """Every example of `split` ("train", "valid", "test") as a sample dict of the
        head's batch keys, fixed shapes; built once per task object."""

    def evaluate(self, split: str, outputs: Sequence[Dict[str, "torch.Tensor"]], directory: Optional[Path]) -> Dict[str, float]:
        """The split's metrics from the head's outputs (its `logits(batch)` entries, one
        dict per sample of `samples(split, ...)`, in order); writes prediction files (SQuAD's
        predictions.json, ...) into `directory` when given."""

    def predict(self, inputs: Mapping[str, object], tokenizer: Tokenizer, infer) -> Dict[str, object]:
        """Answer one request (`question`/`context`, `text`, `choices`); `infer(samples)`
        returns the head's outputs for a list of samples."""


@runtime_checkable
class Predicts(Protocol):
    """Optional for a model: `mega predict CHECKPOINT --question ... --context ...` (or
    `--text ...`) asks it directly (fine-tuned task heads)."""

    def predict(self, inputs: Mapping[str, object], tokenizer: Tokenizer) -> Dict[str, object]:
        """A JSON-serialisable answer for the command line's inputs."""


# --- planning ----------------------------------------------------------------------------------


@runtime_checkable
class EstimatesMemory(Protocol):
    """Optional, on a model's CONFIG class (`model.*`, not the built model): what `mega plan`
    and the memory check of `mega run` need, computed from the config alone, so nothing is
    built or allocated. The kernel (`mega.plan`) adds what it owns: weights, gradients and
    optimizer state by precision and optimizer, data-parallel buckets, and how many
    micro-batches a pipeline schedule keeps in flight."""

    def memory_per_rank(self, vocab_size: int, micro_batch: int, tp: int, pp: int, precision: str,
                        device: str) -> Dict[str, object]:
        """For the tokenizer's `vocab_size`, `micro_batch` samples of the config's own
        lengths, TP x PP ranks, `precision` ("32", "16", "bf16") and `device` ("cpu",
        "cuda"): a dict with `params` (the whole model's parameter count),
        `flops_per_token` (training FLOPs per token, as `CountsFlops`) and `stages`, one
        dict per pipeline stage for one tensor-parallel rank of it: `params` (held there),
        `activations` (bytes autograd keeps for one micro-batch's backward), `transient`
        (bytes alive on top of them around the loss: logits and their gradient),
        `grad_transient` (bytes alive on top of all gradients as backward ends) and,
        optionally, `matmul_params` (the parameters autocast casts to 16 bits; default:
        all) and `recompute_transient` (bytes activation recomputation rebuilds at once in
        the backward, on top of the kept activations; default 0). With the config's own `megatron_amp_O2` set, the model runs in 16 bits
        outside autocast: its residual stream and gradients are 16-bit. Weights, fp32
        gradients and optimizer state per layout are the kernel's to add."""
