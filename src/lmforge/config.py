"""The one config schema, and loading it from a file, the environment and the command line.

Precedence, lowest first: defaults in this schema < the YAML/JSON file < `LMFORGE_SECTION__KEY`
environment variables < dotted `section.key=value` command-line overrides. Every problem is
collected and reported at once, with the file line of the offending key where there is one, and
unknown keys come with the nearest known key.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import os
import re
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lmforge.errors import ConfigError

ENV_PREFIX = "LMFORGE_"
ENV_RESERVED = frozenset({"LMFORGE_MALLOC", "LMFORGE_API_KEY", "LMFORGE_CACHE"})
"""LMFORGE_ variables that are not config overrides: the allocator choice (lmforge.malloc), the
key `lmforge serve` requires by default, and where s3:// models are pulled to (publish.push)."""
EXTRAS = {"wandb": "wandb", "comet": "comet_ml", "tensorboard": "tensorboard"}
"""Optional tracking backends: the extra that installs each, and the module it needs."""


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, and field docstrings become docs."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


class ModelConfig(Section):
    name_or_path: str | None = None
    """A local Hugging Face model directory (or hub id, online only) to start from. Leave empty to
    build a new model from `preset` and/or explicit sizes."""
    preset: str | None = None
    """A built-in architecture for training from scratch: llama-tiny, llama-20m, llama-120m, gpt2-tiny,
    qwen2-tiny (causal LMs) or t5-tiny (seq2seq)."""
    hidden_size: int | None = Field(default=None, gt=0)
    """Width of the model; overrides the preset's."""
    num_layers: int | None = Field(default=None, gt=0)
    """Number of transformer blocks; overrides the preset's."""
    num_heads: int | None = Field(default=None, gt=0)
    """Attention heads; must divide hidden_size."""
    num_kv_heads: int | None = Field(default=None, gt=0)
    """Key/value heads (grouped-query attention); must divide num_heads. Default: num_heads."""
    intermediate_size: int | None = Field(default=None, gt=0)
    """Width of the MLP; overrides the preset's."""
    max_position_embeddings: int | None = Field(default=None, gt=0)
    """Longest sequence the model supports; must be at least data.max_length."""
    tie_embeddings: bool | None = None
    """Share the input embedding and output projection weights."""
    task: Literal["causal-lm", "seq2seq", "classification"] = "causal-lm"
    """What the model is trained to do: next-token prediction (decoder LMs), source-to-target
    generation (T5/BART-style encoder-decoders) or sequence classification (BERT-style encoders)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weight dtype. auto keeps float32 master weights and lets train.precision pick the compute
    dtype; bfloat16/float16 store (and train) the weights in that dtype."""
    freeze: list[str] = []
    """Parameters to keep fixed: "embeddings", "layers.0-5" (a range of blocks), or any parameter-name
    prefix, e.g. model.norm."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third more compute."""
    attention: Literal["auto", "varlen", "sdpa", "eager"] = "auto"
    """Attention kernel of causal LMs. varlen: each packed example attends within itself at its own
    cost (sum of n^2, not rows x max_length^2), through torch's unmasked causal kernels on buckets
    of examples of similar length (under CPU bf16, bf16 matmuls as transformers' eager attention
    computes them, in blocks of 256 query rows past 256 tokens; on Ampere+ GPUs in fp16/bf16,
    torch's FlashAttention-2 varlen kernel on the flat tokens, no buckets). sdpa/eager:
    transformers' own, with a block-diagonal mask for packed rows.
    auto: varlen where the architecture allows it (no sliding window or soft-capping) and
    train.compile is off, else sdpa."""
    trust_remote_code: bool = False
    """Allow a pretrained model directory to run its own Python code. Only for sources you trust."""
    architecture: str | None = None
    """The family of a causal LM built from scratch: a Hugging Face model_type (as in a config.json),
    e.g. llama (the default), gpt2, qwen2, mistral; without it, the preset's (gpt2-tiny, qwen2-tiny).
    The sizes (a preset's, then explicit ones) go under the family's own names (gpt2: n_embd, n_layer,
    n_head, n_inner); those not given keep the family's defaults, but num_kv_heads (num_heads),
    head_dim (hidden_size / num_heads) and the positions (raised to data.max_length). The new model is
    checked before training: causal, and its packed examples kept apart by the attention in use
    (model.attention=auto falls back to the family's own where varlen differs from it)."""
    config: dict[str, Any] = {}
    """Fields of the family's Hugging Face config class for a model built from scratch, by the class's
    names or its attribute_map's (hidden_size is gpt2's n_embd), e.g. {n_positions: 2048} for gpt2,
    {rope_theta: 1e6} for qwen2, {sliding_window: null} for mistral (no window: varlen attention).
    They win over the sizes, the preset and model.dropout; a name the class does not know is an error."""
    dropout: float | None = Field(default=None, ge=0.0, lt=1.0)
    """Dropout probability for every dropout field of the model's config (names holding dropout or
    pdrop: gpt2's attn_pdrop, embd_pdrop, resid_pdrop and summary_first_dropout; Llama's and Qwen2's
    attention_dropout; T5's dropout_rate), saved in its config.json; a family with none is an error.
    Also for a pretrained model (model.name_or_path): its modules are built with it. null keeps the
    family's or the model's own (Llama and Qwen2: 0; GPT-2: 0.1)."""


class LoraConfig(Section):
    r: int = Field(default=16, ge=1)
    """Rank of the low-rank update."""
    alpha: float = Field(default=32, gt=0)
    """Scale of the update: alpha / r (alpha / sqrt(r) with use_rslora)."""
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    """Dropout on the adapter's input."""
    target_modules: Literal["all-linear"] | list[str] = "all-linear"
    """Modules that get adapters: all-linear (every linear layer but the output head) or names,
    e.g. [q_proj, v_proj]."""
    use_dora: bool = False
    """Weight-decomposed LoRA (DoRA): learns magnitude and direction separately."""
    use_rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r)."""
    modules_to_save: list[str] | None = None
    """Modules trained in full and saved with the adapter, e.g. [classifier]. A classifier's head is
    always included."""
    quantize: Literal["4bit", "8bit"] | None = None
    """QLoRA: load the frozen base model quantized with bitsandbytes. Needs a CUDA GPU."""


class TokenizerConfig(Section):
    train: bool = False
    """Train a byte-level BPE tokenizer on the training split (for models built from scratch)."""
    path: str | None = None
    """An existing tokenizer directory to use for a model built from scratch."""
    vocab_size: int = Field(default=8192, ge=260)
    """Vocabulary size of a trained tokenizer, special tokens included."""
    min_frequency: int = Field(default=2, ge=1)
    """A pair must occur this often in the corpus to be merged."""


class SourceSpec(Section):
    path: str
    """A file, glob, directory, or a directory saved with datasets' save_to_disk."""
    weight: float = Field(default=1.0, gt=0)
    """Sampling weight: 2 repeats every record twice, 0.5 keeps half of them (chosen by hash)."""


Sources = str | list[str | SourceSpec]


class CurriculumStage(Section):
    data: Sources
    """This stage's training data, as data.train takes it (a file, glob, directory, or a list of them
    or of {path, weight})."""
    until_step: int | None = Field(default=None, ge=1)
    """The stage trains up to and including this optimizer step (as logged, counting from 1); the
    next stage starts after it. The last stage may leave it out: it trains to the end of the run;
    with it, the steps after it go through the data of every stage in seeded epochs."""


class CurriculumConfig(Section):
    """Easy examples first (competence-based curriculum, Platanios et al. 2019). Every training row
    gets a difficulty level when the data is prepared: examples are ranked by difficulty (ties
    broken by a hash of the record seeded with the run's seed, never by file order) and cut into
    `levels` buckets of equal count; with stages, the level is the stage. Packing never puts two
    levels in one row.

    During the curriculum phase (the first `steps` optimizer steps, or the stages), the rows of step t
    are drawn from the pool of step t alone, by a draw seeded with (seed, t): the same on every
    process and after a resume. After it, training goes through all the data in the usual seeded
    epochs. The phase's steps count toward the run's length (train.max_steps or train.epochs x the
    steps of an epoch)."""

    column: str | None = None
    """A numeric record field holding each example's difficulty (higher is harder); a training record
    without it, or whose value is no number, is invalid (data.on_invalid). Default (and without
    stages): the example's length in tokens, short to long (the pieces of a text cut at
    data.max_length have their whole record's)."""
    stages: list[CurriculumStage] | None = None
    """Train on one mix, then the next: each stage's data until its until_step. The stages' data is
    the training data: data.train, which the schema requires, must name the first stage's data (it is
    checked). Validation and test: data.validation / data.test, or their fractions split off every
    stage's records by hash."""
    start: float = Field(default=0.2, gt=0.0, le=1.0)
    """The easiest fraction of the training rows available at step 0 (not with stages)."""
    schedule: Literal["linear", "step"] = "linear"
    """How the available fraction c grows to 1 over `steps` (not with stages). linear: c(t) = start +
    (1 - start) t / steps, the easiest ceil(c N) rows; step: whole levels, from the one that holds the
    easiest `start` of the rows, one more in each of equal intervals."""
    steps: int | None = Field(default=None, ge=1)
    """Optimizer steps of the curriculum phase, until all the data is available; later steps go
    through the whole data in seeded epochs. Default: half of the run. Not with stages (their
    until_step says it). Set it when the run may be resumed with a longer train.max_steps, or the
    default moves with it."""
    levels: int = Field(default=4, ge=2)
    """Difficulty levels, equal-count buckets by difficulty (not with stages: a stage is a level).
    The step schedule adds one at a time; packing never puts examples of two levels in one row."""


class DataConfig(Section):
    train: Sources
    """Training data: a file, glob, directory, or a list of these or of {path, weight} to mix
    sources. .txt/.text, .jsonl, .json, .csv, .parquet, or a saved datasets directory."""
    validation: Sources | None = None
    """Validation data. Default: `validation_fraction` of the training records, chosen by a hash
    of each record, so the split never changes between runs."""
    test: Sources | None = None
    """Test data, evaluated once at the end. Default: `test_fraction` split off like validation."""
    format: Literal["text", "prompt-completion", "alpaca", "chat", "seq2seq", "classification"] = "text"
    """How a record becomes training text: text (plain documents), prompt-completion, alpaca
    (instruction/input/output) or chat (a list of {role, content} messages) for causal LMs;
    seq2seq (source/target) for model.task=seq2seq; classification (text/label)."""
    labels: list[str] | None = None
    """Classification labels in class-id order. Default: the sorted labels of the training data."""
    max_target_length: int | None = Field(default=None, ge=2)
    """seq2seq: longest target in tokens (truncated beyond). Default: max_length."""
    columns: dict[str, str] = {}
    """Record fields for the format's fields, e.g. {prompt: question, completion: answer};
    unnamed ones are looked up under their own name (text, prompt, completion, instruction,
    input, output, messages, source, target, label). For chat also the keys of a message (role,
    content) and the record's names of the roles (system, user, assistant), e.g. {messages:
    conversations, role: from, content: value, user: human, assistant: gpt} (ShareGPT's, which
    is recognised without it)."""
    template: str | None = None
    """Prompt template for prompt-completion/alpaca, with {prompt} (or any record field) in braces,
    e.g. "<human>: {prompt}\n<assistant>: ". Default: the prompt as is / the Alpaca template."""
    chat_template: Literal["auto", "chatml", "llama-3", "gemma", "plain"] = "auto"
    """Chat rendering: auto uses the tokenizer's own template when it has one, else chatml."""
    loss_on: Literal["completion", "all"] = "completion"
    """Train on completion/assistant tokens only, or on every token."""
    text_field: str = "text"
    """The field holding the text of .jsonl/.csv/.parquet records for the text format."""
    txt_documents: Literal["paragraph", "line", "file"] = "paragraph"
    """How a .txt file is cut into documents: at blank lines, at every line, or not at all."""
    max_length: int = Field(default=512, ge=8)
    """Longest training row, in tokens."""
    on_too_long: Literal["split", "truncate", "drop", "error"] | None = None
    """Records longer than max_length: split into pieces (text only), truncate (completion-aware:
    a record left without trained tokens is dropped), drop, or error. Default: split for text,
    truncate otherwise."""
    on_invalid: Literal["error", "drop"] = "error"
    """Malformed lines, missing columns, wrong types, empty prompts/answers: stop with an error
    naming file and line, or drop and count them in the data report."""
    packing: bool | None = None
    """Pack several examples per row (best-fit decreasing) with per-example position ids; no example
    attends to another. Off: one example per row, dynamic padding. Default: on for causal LMs
    (the only models it applies to)."""
    group_by_length: bool = True
    """Without packing, batch rows of similar length together (less padding)."""
    order: Literal["shuffle", "length_ascending", "as_is"] = "shuffle"
    """Row order each epoch: a seeded shuffle, shortest first (a simple curriculum), or file order."""
    validation_fraction: float = Field(default=0.05, ge=0.0, lt=1.0)
    """Share of training records held out for validation when `validation` is not given."""
    test_fraction: float = Field(default=0.05, ge=0.0, lt=1.0)
    """Share of training records held out for testing when `test` is not given."""
    cache_dir: str | None = None
    """Where tokenizers and tokenized data are cached. Default: ~/.cache/lmforge."""
    num_proc: int = Field(default=1, ge=1)
    """Worker processes for formatting and tokenization; worth raising for large corpora."""
    curriculum: CurriculumConfig | None = None
    """Easy examples first: `length` (short to long), {column: NAME} (a difficulty score in the
    data) or {stages: [{data: ..., until_step: N}, ...]} (one mix, then the next); absent: none."""

    @field_validator("curriculum", mode="before")
    @classmethod
    def _curriculum_shorthand(cls, value: Any) -> Any:
        return {} if value == "length" else value

    prefetch: int = Field(default=2, ge=0)
    """Optimizer steps of micro-batches read and collated ahead in a background thread (pinned in
    memory on CUDA), so the loop never waits on data; 0 reads them in the loop."""

    @property
    def too_long(self) -> str:
        return self.on_too_long or ("split" if self.format == "text" else "truncate")

    @property
    def packs(self) -> bool:
        return self.packing is not False and self.format not in ("seq2seq", "classification")


class EarlyStoppingConfig(Section):
    metric: Literal["eval/loss", "eval/perplexity", "eval/token_accuracy", "eval/accuracy", "eval/macro_f1"] = (
        "eval/loss"
    )
    """Validation metric to watch."""
    mode: Literal["min", "max"] | None = None
    """Whether lower or higher is better. Default: max for accuracy, min otherwise."""
    patience: int = Field(default=3, ge=1)
    """Evaluations without improvement before training stops."""
    min_delta: float = Field(default=0.0, ge=0.0)
    """Smallest change that counts as an improvement."""
    restore_best: bool = True
    """Write the best evaluation's weights (not the last) to final/."""

    @property
    def direction(self) -> str:
        return self.mode or ("max" if self.metric.endswith(("accuracy", "f1")) else "min")


class LrFindConfig(Section):
    start_lr: float = Field(default=1e-7, gt=0.0)
    """The range test's first learning rate."""
    end_lr: float = Field(default=10.0, gt=0.0)
    """Its last learning rate (it stops earlier when the loss diverges)."""
    num_steps: int = Field(default=100, ge=5)
    """Optimizer steps of the test; the learning rate grows exponentially from start_lr to end_lr."""
    smoothing: float = Field(default=0.98, ge=0.0, lt=1.0)
    """The loss curve is an exponential moving average with this weight on the past (fastai's 0.98),
    bias-corrected."""
    diverge_factor: float = Field(default=4.0, gt=1.0)
    """The test stops when the smoothed loss exceeds this times its lowest value."""
    suggestion: Literal["valley", "steepest", "minimum"] = "valley"
    """The suggestion train.lr=find trains with: valley (the middle of the longest descent), steepest
    (the steepest descent) or minimum (the lowest loss's lr / 10)."""


class TrainConfig(Section):
    epochs: int = Field(default=1, ge=1)
    """Passes over the training data (ignored when max_steps is set)."""
    max_steps: int | None = Field(default=None, ge=1)
    """Optimizer steps to train for; overrides epochs."""
    micro_batch_size: int = Field(default=8, ge=1)
    """Rows per forward/backward pass."""
    grad_accum: int = Field(default=1, ge=1)
    """Micro-batches per optimizer step."""
    lr: float | Literal["find"] = 3e-4
    """Peak learning rate, or find: run the learning-rate range test (train.lr_find) first and
    train with its suggestion, which the saved config records."""
    lr_find: LrFindConfig = LrFindConfig()
    """The learning-rate range test of `lmforge lr-find` and train.lr=find."""
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "adafactor", "sgd", "lion"] = "adamw"
    """adamw (torch's fused kernel), adamw_8bit / paged_adamw_8bit (bitsandbytes, CUDA only: a
    quarter of AdamW's optimizer memory; paged moves it to the CPU when the GPU runs out), adafactor
    (torch's: factored second moments, little optimizer memory; its step is relative to each
    weight's size, so it takes a larger lr, ~1e-2), sgd (with train.momentum, train.nesterov), lion
    (lion-pytorch: sign updates with betas train.adam_beta1/2; use a 3-10x smaller lr and larger
    weight decay than AdamW)."""
    momentum: float | None = Field(default=None, ge=0.0, lt=1.0)
    """sgd's momentum (sgd only). Default 0.9."""
    nesterov: bool = False
    """sgd: Nesterov momentum (needs a momentum above 0)."""
    min_lr_ratio: float = Field(default=0.0, ge=0.0, le=1.0)
    """Floor of the decay, as a fraction of lr: where linear, cosine, cosine_with_restarts,
    polynomial (transformers' lr_end = lr * min_lr_ratio) and wsd end, and where inverse_sqrt stops
    decaying. Refused with constant, which never decays."""
    scheduler: Literal["constant", "linear", "cosine", "cosine_with_restarts", "polynomial", "inverse_sqrt", "wsd"] = (
        "cosine"
    )
    """Learning-rate schedule after the linear warmup, each as transformers' function of the same
    name: constant, linear, cosine (half a cosine), cosine_with_restarts (train.num_cycles cosines,
    each restarting at lr), polynomial ((1 - progress) ** train.power), inverse_sqrt (1/sqrt(step /
    warmup); timescale 10,000 steps without warmup), wsd (warmup-stable-decay: lr until the last
    train.decay_ratio of the steps, then train.decay_shape down to the floor)."""
    num_cycles: int | None = Field(default=None, ge=1)
    """cosine_with_restarts only: how many cosine decays, each restarting at lr. Default 2."""
    power: float | None = Field(default=None, gt=0.0)
    """polynomial only: the decay's exponent (1 is linear). Default 1."""
    decay_ratio: float | None = Field(default=None, gt=0.0, le=1.0)
    """wsd (warmup-stable-decay) only: the share of the steps spent decaying at the end (rounded to
    whole steps, at least one, after the warmup). Default 0.2."""
    decay_shape: Literal["linear", "cosine", "1-sqrt"] | None = None
    """wsd only: the shape of the final decay. Default 1-sqrt (Hägele et al. 2024: as good as a
    cosine schedule of the same length)."""

    @field_validator("lr", mode="before")
    @classmethod
    def _positive_lr(cls, lr: Any) -> Any:
        if lr == "find":
            return lr
        try:
            number = float(lr)
        except (TypeError, ValueError):
            number = float("nan")
        if isinstance(lr, bool) or not number > 0 or number == float("inf"):
            raise ValueError("a learning rate is a number above 0, or find (the range test picks it)")
        return number

    warmup_steps: int | None = Field(default=None, ge=0)
    """Steps of linear warmup from 0 to lr. Exclusive with warmup_ratio."""
    warmup_ratio: float | None = Field(default=None, ge=0.0, lt=1.0)
    """Warmup as a fraction of the total steps. Exclusive with warmup_steps."""
    weight_decay: float = Field(default=0.01, ge=0.0)
    """Weight decay (decoupled in AdamW, Adafactor and Lion; L2 added to the gradient in SGD); never
    applied to norms, biases or embeddings."""
    adam_beta1: float = Field(default=0.9, ge=0.0, lt=1.0)
    """AdamW's (and Lion's) beta1."""
    adam_beta2: float = Field(default=0.999, ge=0.0, lt=1.0)
    """AdamW's (and Lion's) beta2."""
    adam_eps: float = Field(default=1e-8, gt=0.0)
    """AdamW's epsilon (adamw and the 8-bit ones)."""
    max_grad_norm: float | None = Field(default=1.0, gt=0.0)
    """Clip the global gradient norm to this; null disables clipping."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Compute precision. auto: bf16 on GPUs that support it, else fp16 with a grad scaler on
    CUDA; on a CPU bf16 where it computes bf16 natively (AVX512-BF16 or AMX: the validation loss
    of fp32 at about twice the speed, bench/RESULTS.md), else fp32. bf16 is autocast over fp32
    master weights. fp16 needs CUDA."""
    eval_every: int | None = Field(default=200, ge=1)
    """Evaluate on validation every this many steps (and always at the end); null: only at the end."""
    log_every: int = Field(default=10, ge=1)
    """Log training metrics every this many steps. Each log costs one device sync."""
    save_every: int | None = Field(default=200, ge=1)
    """Save a checkpoint every this many steps; null: only at the end, on a stop and at a new best."""
    keep_last: int = Field(default=3, ge=1)
    """Checkpoints kept, besides the best one, which is always kept."""
    max_time: float | None = Field(default=None, gt=0)
    """Seconds of training in this invocation; when reached, save a checkpoint and stop (resume later)."""
    num_threads: int | None = Field(default=None, ge=1)
    """CPU threads for tensor work (torch.set_num_threads). Default: OMP_NUM_THREADS where it is set,
    else the physical cores this process may use (its CPU affinity and cgroup quota, which PyTorch's
    own default ignores), shared among the job's processes on the machine. On a machine that other
    jobs keep busy, fewer threads than cores can be several times faster (threads that wait for a
    core stall the others); the plan line says how many are used and why."""
    compile: bool = False
    """Compile the model with torch.compile (inductor). The first steps are slow while it compiles;
    fixed shapes (packing) avoid recompiling. Needs a C/C++ compiler on CPU."""
    loss_chunk_size: int | Literal["auto"] | None = "auto"
    """Causal LMs: compute the loss from hidden states, this many target tokens at a time, never
    holding full-vocabulary logits for the whole batch (a large memory saving at big vocabularies
    and long sequences, and faster: each chunk's gradients are taken with its logits, and positions
    without a target are skipped). The same loss and gradients. auto: chunks of about 8M logits on
    CPU (1024 tokens at vocab 8k, 256 at 32k) and 64M on CUDA (2048 at 32k, where fewer, larger chunks
    keep the GPU ahead of Python's kernel launches), or the plain loss where chunking does not apply
    (soft-capped or scaled logits, adapter or quantized heads, FSDP/DeepSpeed, train.compile).
    null: the plain loss."""
    max_bad_steps: int = Field(default=5, ge=1)
    """Consecutive steps with a non-finite loss or gradient norm (each skipped) before the run fails."""
    early_stopping: EarlyStoppingConfig | None = None
    """Stop when the validation metric stops improving; absent: train for the full length."""
    mirror: str | None = None
    """Copy every complete checkpoint (after its manifest) and, at the end, the run's outputs to
    remote storage in the background, so that `lmforge train CONFIG --resume auto` on a fresh
    machine continues from it: s3://bucket/prefix (an S3-compatible server through `storage`) or a
    local directory (a mounted network drive, e.g. Google Drive on Colab). A failing upload is
    retried and reported like a failing tracker; it never blocks a step. Credentials come from
    the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), never from here. See docs/cloud.md."""

    @field_validator("mirror")
    @classmethod
    def _mirror_url(cls, mirror: str | None) -> str | None:
        if mirror is None:
            return None
        if "://" in mirror and not mirror.startswith(("s3://", "file://")):
            raise ValueError(
                f"{mirror!r}: a mirror is s3://bucket/prefix or a local directory (file:// or a path); "
                "hf:// and mlflow:// are for `lmforge push`"
            )
        if mirror.startswith("s3://") and not mirror[len("s3://") :].split("/")[0]:
            raise ValueError(f"{mirror!r}: no bucket; write s3://bucket/prefix")
        return mirror


class GenerateConfig(Section):
    num_examples: int = Field(default=4, ge=0)
    """Samples generated before and after training and saved to examples.jsonl."""
    max_new_tokens: int = Field(default=64, ge=1)
    """Length of each sample."""
    prompts: list[str] | None = None
    """Prompts to sample from. Default: the opening tokens of held-out documents."""
    prompt_tokens: int = Field(default=12, ge=1)
    """Tokens taken from a held-out document as its prompt when `prompts` is not given."""
    temperature: float = Field(default=0.8, ge=0.0)
    """Sampling temperature; 0 means greedy decoding."""
    top_k: int | None = Field(default=50, ge=1)
    """Sample only among the k most likely tokens; null: among all of them."""
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    """Nucleus sampling: only among the most likely tokens whose probabilities add up to p."""
    stop: list[str] = []
    """Strings that end a generation (not included in the text)."""
    max_examples: int = Field(default=200, ge=0)
    """The final evaluation answers this many held-out examples greedily (batched), for
    predictions.jsonl and the generation metrics in eval.json; 0: none. Losses are computed for
    every example regardless."""

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, stop: list[str]) -> list[str]:
        if any(not s for s in stop):
            raise ValueError("a stop string cannot be empty (it would end every answer before it starts)")
        return stop


class JudgeConfig(Section):
    base_url: str
    """The OpenAI-compatible endpoint, e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1
    (`lmforge serve`)."""
    model: str
    """The judge model's name at that endpoint."""
    api_key_env: str | None = None
    """The environment variable holding the endpoint's API key (the key itself never goes in a
    config); null: no key."""
    criteria: list[str] = Field(default=["relevance", "completeness", "clarity"], min_length=1)
    """What the judge grades, each from 1 (poor) to 5 (excellent); each becomes a metric judge_<name>."""
    max_examples: int = Field(default=100, ge=1)
    """Answers graded, at most (of those eval.generate.max_examples produced)."""
    timeout: float = Field(default=60.0, gt=0)
    """Seconds per request."""
    max_tokens: int = Field(default=256, ge=1)
    """Length of the judge's reply."""
    concurrency: int = Field(default=4, ge=1)
    """Requests in flight at once."""

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        from urllib.parse import urlsplit

        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - raises on a port that is no number
        except ValueError as exc:
            raise ValueError(f"{url!r} is no URL ({exc}); write http(s)://host[:port]/v1") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{url!r} is no http(s) URL; write e.g. http://127.0.0.1:8000/v1")
        return url

    @field_validator("api_key_env")
    @classmethod
    def _variable_name(cls, name: str | None) -> str | None:
        if name is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ValueError(
                "not an environment variable name (letters, digits and _); put the key in a variable, e.g. "
                "export JUDGE_API_KEY=..., and give its name: api_key_env: JUDGE_API_KEY"
            )
        return name

    @field_validator("criteria")
    @classmethod
    def _criteria_names(cls, criteria: list[str]) -> list[str]:
        bad = [c for c in criteria if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_ -]*", c)]
        if bad:
            raise ValueError(f"{bad}: a criterion is a word or words (letters, digits, _, - and spaces)")
        names = [re.sub(r"[\s-]+", "_", c.strip().lower()) for c in criteria]
        if len(set(names)) != len(names):
            raise ValueError(f"{criteria}: two criteria give the same metric name (judge_<criterion>)")
        return criteria


class StorageConfig(Section):
    endpoint_url: str | None = None
    """An S3-compatible server (MinIO, Ceph, R2, a moto server) for s3:// URLs. Default: the
    AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL environment variable, else AWS itself."""
    region: str | None = None
    """The bucket's region. Default: AWS_REGION / AWS_DEFAULT_REGION / the AWS config."""
    multipart_threshold_mb: int = Field(default=64, ge=5)
    """Files at least this large (MiB) are uploaded in parts, in parallel and each retried alone."""
    multipart_chunk_mb: int = Field(default=64, ge=5)
    """Part size (MiB; S3's minimum is 5)."""


class EvalConfig(Section):
    batch_size: int | None = Field(default=None, ge=1)
    """Rows per evaluation batch. Default: train.micro_batch_size."""
    max_batches: int | None = Field(default=None, ge=1)
    """Validate on at most this many batches (the same ones every time). The final test
    evaluation and predictions.jsonl always cover the whole split."""
    at_start: bool = True
    """Also evaluate before the first step, so the improvement is on record."""
    generate: GenerateConfig = GenerateConfig()
    """Sample generation."""
    predictions: bool = True
    """Write predictions.jsonl at the final evaluation: every example of the test split (else
    validation) with its input, reference, greedy answer, loss and scores."""
    metrics_plugins: list[str] = []
    """Custom metrics, "module:function" each: a function (predictions, references, inputs) ->
    {name: number (corpus level) or list of numbers (one per example)}, imported from the working
    directory or the Python path. A plugin that fails is reported and loses nothing else."""
    bootstrap_resamples: int = Field(default=1000, ge=0)
    """Resamples of the 95% bootstrap intervals of the final metrics (0: none)."""
    judge: JudgeConfig | None = None
    """Grade each greedy answer of the final evaluation with an LLM judge (any OpenAI-compatible
    endpoint); absent: no judge."""


class MlflowConfig(Section):
    tracking_uri: str | None = None
    """Where MLflow stores runs: a server (http://host:5000), a database URI or a directory.
    Default: an embedded sqlite store, <output_dir>/mlflow.db. Credentials belong in
    MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD / MLFLOW_TRACKING_TOKEN, not here."""
    experiment: str = "default"
    """MLflow experiment name."""
    parent_run_id: str | None = None
    """Nest this run under an existing MLflow run (a sweep's parent run)."""
    log_model: bool = False
    """Log the final model as an MLflow pyfunc model (loads with mlflow.pyfunc.load_model)."""
    register_as: str | None = None
    """Register the logged model under this name in the MLflow model registry (implies log_model)."""


class WandbConfig(Section):
    project: str = "lmforge"
    """W&B project."""
    entity: str | None = None
    """W&B team or user; default: the API key's default entity."""
    mode: Literal["online", "offline"] = "online"
    """online streams to the W&B server (WANDB_API_KEY from the environment); offline writes the
    run under <run dir>/wandb for a later `wandb sync`."""


class CometConfig(Section):
    project: str = "lmforge"
    """Comet project."""
    workspace: str | None = None
    """Comet workspace; default: the API key's default workspace."""
    mode: Literal["online", "offline"] = "online"
    """online streams to Comet (COMET_API_KEY from the environment); offline writes a zip archive
    under <run dir>/comet for a later `comet upload`."""


class TrackingConfig(Section):
    backends: list[Literal["mlflow", "wandb", "comet", "tensorboard", "none"]] = ["mlflow"]
    """Trackers besides the local metrics.jsonl, which is always written and is the source of truth.
    wandb, comet and tensorboard are extras: pip install 'lmforge[wandb]' (or comet, tensorboard)."""
    mlflow: MlflowConfig = MlflowConfig()
    """MLflow settings."""
    wandb: WandbConfig = WandbConfig()
    """Weights & Biases settings."""
    comet: CometConfig = CometConfig()
    """Comet settings."""
    study: str | None = None
    """A study (sweep) this run belongs to: a tag in every backend, the group in W&B."""
    tags: dict[str, str] = {}
    """Extra tags for the run in every backend (numbers and booleans are taken as their text)."""

    @field_validator("tags", mode="before")
    @classmethod
    def _tag_values_as_text(cls, tags: Any) -> Any:
        if isinstance(tags, dict):
            return {
                k: str(v).lower() if isinstance(v, bool) else str(v) if isinstance(v, int | float) else v
                for k, v in tags.items()
            }
        return tags

    system_metrics: bool = True
    """Log process memory (RSS) and CUDA memory with each train log line."""
    flush_timeout: float = Field(default=30.0, ge=0)
    """At the end of a run, seconds to wait for a failing backend to come back before giving up on
    it (its points stay in metrics.jsonl; `lmforge sync RUN` replays them later)."""

    @field_validator("backends")
    @classmethod
    def _installed(cls, backends: list[str]) -> list[str]:
        missing = [name for name in backends if name in EXTRAS and importlib.util.find_spec(EXTRAS[name]) is None]
        if missing:
            one = len(missing) == 1
            raise ValueError(
                f"{' and '.join(missing)} {'is' if one else 'are'} not installed: pip install "
                f"'lmforge[{','.join(missing)}]', or remove {'it' if one else 'them'} from tracking.backends"
            )
        return backends


class FsdpConfig(Section):
    """Fully sharded data parallel (PyTorch's FSDP2, `torch.distributed.fsdp.fully_shard`): each
    process holds 1/N of the weights, gradients and optimizer state, gathering a block's weights for
    its forward and backward only."""

    reshard_after_forward: bool = True
    """Free a block's gathered weights after its forward (gathered again for the backward): less
    memory, one more all-gather per block (FSDP2's default; ZeRO-3). false keeps them until the
    backward (ZeRO-2-like)."""
    cpu_offload: bool = False
    """Keep the sharded weights, gradients and optimizer state in CPU memory (FSDP2's
    CPUOffloadPolicy): the optimizer step runs on the CPU. For a GPU job whose model does not fit."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward instead of keeping them (transformers'
    gradient checkpointing): about a third more compute for much less activation memory."""


class DeepSpeedConfig(Section):
    """DeepSpeed ZeRO through accelerate (the deepspeed package: pip install 'lmforge[deepspeed]'). On a
    machine without CUDA it trains on the CPU over gloo, as DeepSpeed's CPU accelerator does."""

    zero_stage: Literal[2, 3] = 2
    """ZeRO stage: 2 shards optimizer state and gradients, 3 the weights too."""
    offload: Literal["none", "cpu", "nvme"] = "none"
    """Where the optimizer state (and, at stage 3, the weights) are offloaded."""
    config_file: str | None = None
    """A DeepSpeed JSON config instead of the two settings above ("auto" values are filled in by
    accelerate from the run's batch sizes and precision)."""


class DistributedConfig(Section):
    """A job of several processes (`lmforge train --nproc/--nnodes`, torchrun, accelerate launch)."""

    strategy: Literal["auto", "ddp", "fsdp", "deepspeed"] = "auto"
    """How the processes share the work. ddp: every process holds the whole model and gradients are
    averaged (DistributedDataParallel). fsdp: weights, gradients and optimizer state are sharded
    (see distributed.fsdp); checkpoints are sharded too and resume on another number of processes.
    deepspeed: ZeRO through accelerate; its checkpoints resume on as many processes as wrote them.
    auto: what `accelerate launch` was configured
    with (its FSDP or DeepSpeed settings), else ddp. A job of one process trains unsharded."""
    fsdp: FsdpConfig = FsdpConfig()
    """FSDP settings (used with strategy: fsdp)."""
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    """DeepSpeed settings (used with strategy: deepspeed)."""
    timeout_minutes: float = Field(default=60, gt=0)
    """How long a process waits for the others at a collective (the process group's timeout) before
    the job fails: long enough for the slowest step, evaluation or checkpoint save of any process."""


class Config(Section):
    name: str = Field(default="run", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    """Run name; the run directory is <output_dir>/<name>-<time>/."""
    seed: int = Field(default=42, ge=0)
    """Seeds model initialisation, data order and dropout."""
    output_dir: str = "runs"
    """Where run directories are created."""
    model: ModelConfig = ModelConfig()
    """The model to train."""
    tokenizer: TokenizerConfig = TokenizerConfig()
    """The tokenizer, for models built from scratch."""
    lora: LoraConfig | None = None
    """Train low-rank adapters instead of all weights; absent: full fine-tuning."""
    data: DataConfig
    """Training, validation and test data."""
    train: TrainConfig = TrainConfig()
    """The optimisation loop."""
    eval: EvalConfig = EvalConfig()
    """Evaluation and sampling."""
    tracking: TrackingConfig = TrackingConfig()
    """Experiment tracking."""
    storage: StorageConfig = StorageConfig()
    """Remote storage for s3:// URLs: train.mirror, `lmforge push/pull`, model.name_or_path."""
    distributed: DistributedConfig = DistributedConfig()
    """Jobs of several processes or machines."""


# --------------------------------------------------------------------------- loading


def load_config(
    path: str | Path | None,
    overrides: Iterable[str] = (),
    env: Mapping[str, str] | None = None,
    check_files: bool = False,
) -> Config:
    """Load, merge and validate a config.

    Args:
        path: YAML or JSON file; None starts from the schema defaults alone.
        overrides: dotted `key=value` strings from the command line; values are parsed as YAML.
        env: environment to read `LMFORGE_*` overrides from (default: `os.environ`).
        check_files: also check that the data files and model/tokenizer directories it names exist
            (relative paths are resolved against the working directory), for the commands that read
            them (train, data inspect, config validate).

    Returns:
        The validated config.

    Raises:
        ConfigError: listing every problem found.
    """
    source = str(path) if path is not None else None
    raw, key_lines = _read_file(Path(path)) if path is not None else ({}, {})
    problems: list[str] = []
    origins: dict[str, str] = {}
    literal: dict[str, str] = {}  # each override's text as typed
    env = os.environ if env is None else env
    for name, value in sorted(env.items()):
        if name.startswith(ENV_PREFIX) and name != ENV_PREFIX and name not in ENV_RESERVED:
            dotted = name[len(ENV_PREFIX) :].lower().replace("__", ".")
            _apply_override(raw, dotted, value, f"environment variable {name}", origins, problems)
            literal[dotted] = value
    for item in overrides:
        if "=" not in item:
            problems.append(f"override {item!r}: expected key=value, e.g. train.lr=3e-4")
            continue
        dotted, value = item.split("=", 1)
        _apply_override(raw, dotted.strip(), value, f"override {item!r}", origins, problems)
        literal[dotted.strip()] = value
    problems += [text for _, text in (_located(p, key_lines, origins, source) for p in _unspaced_colons(raw))]
    if problems:
        raise ConfigError(problems, source)
    try:
        config = _validate_literally(Config, raw, literal)
    except ValidationError as exc:
        raise ConfigError(_describe_errors(exc, raw, key_lines, origins, source), source) from None
    problems = check_config(config) + (check_paths(config) if check_files else [])
    located = sorted((_located(p, key_lines, origins, source) for p in problems), key=lambda item: item[0])
    if located:
        raise ConfigError([text for _, text in located], source)
    return config


def override_data(data: DataConfig, overrides: Iterable[str]) -> DataConfig:
    """`data` with dotted `data.*` overrides applied and validated (commands that read data but
    train nothing: `lmforge eval`).

    Raises:
        ConfigError: an override outside data.*, or a value the schema refuses.
    """
    raw: dict[str, Any] = {"data": data.model_dump(mode="json")}
    problems: list[str] = []
    origins: dict[str, str] = {}
    literal: dict[str, str] = {}
    for item in overrides:
        dotted, _, value = item.partition("=")
        dotted = dotted.strip()
        if not _ or not dotted.startswith("data."):
            problems.append(f"override {item!r}: this command takes data.* overrides only, e.g. data.text_field=body")
            continue
        _apply_override(raw, dotted, value, f"override {item!r}", origins, problems)
        literal[dotted] = value
    if problems:
        raise ConfigError(problems)
    try:
        return _validate_literally(DataConfig, raw["data"], literal, prefix="data.")
    except ValidationError as exc:
        raise ConfigError(
            [
                f"{origins.get('data.' + '.'.join(map(str, e['loc'])), 'data')}: data.{'.'.join(map(str, e['loc']))}: "
                f"{e['msg']} (got {e.get('input')!r})"
                for e in exc.errors()
            ]
        ) from None


def _validate_literally(model: type[BaseModel], raw: dict[str, Any], literal: dict[str, str], prefix: str = ""):
    """Validate `raw` as `model`; where a string setting was given on the command line or in the
    environment (`literal`, by dotted key) and YAML read it as something else
    (`data.template=Q: {prompt}` is a mapping to YAML), take the text as typed and validate again."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        retyped = False
        for error in exc.errors():
            dotted = prefix + ".".join(str(part) for part in error["loc"])
            if error["type"] == "string_type" and dotted in literal:
                _set(raw, dotted.removeprefix(prefix), literal[dotted])
                retyped = True
        if not retyped:
            raise
    return model.model_validate(raw)


def _set(raw: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        raw = raw[key]
    raw[last] = value


def _unspaced_colons(node: Any, dotted: str = "") -> list[str]:
    """Keys YAML read with their value (`{n_embd:32}` is the key 'n_embd:32' with no value: YAML's
    colon needs a space after it), each named with the fix."""
    if not isinstance(node, dict):
        return []
    problems = []
    for key, value in node.items():
        name = f"{dotted}.{key}" if dotted else str(key)
        if isinstance(key, str) and value is None and re.fullmatch(r"[A-Za-z_][\w.-]*:\S.*", key):
            field, given = key.split(":", 1)
            problems.append(
                f"{name}: YAML reads {key!r} as one key with no value (a colon needs a space after it): write "
                f"{field}: {given}"
            )
        problems += _unspaced_colons(value, name)
    return problems


def _located(problem: str, key_lines: dict[str, int], origins: dict[str, str], source: str | None) -> tuple[int, str]:
    """(line, problem): a cross-field problem prefixed with where its first setting was given (file:line
    or the override), when it was given; the line orders problems as the file does."""
    named = [key for key in origins if problem.startswith((f"{key}:", f"{key}."))]  # keys may hold any text
    match = re.match(r"([a-z_]+(?:\.[a-z_0-9]+)+)", problem)
    if not named and not match:
        return 1 << 30, problem
    dotted = max(named, key=len) if named else match.group(1)
    line = next((key_lines[k] for k in _prefixes(dotted) if k in key_lines), 1 << 30)
    return line, _where(dotted, key_lines, origins, source) + problem


def _read_file(path: Path) -> tuple[dict[str, Any], dict[str, int]]:
    """Parse a YAML/JSON config; return it and the 1-based line of every dotted key."""
    if not path.is_file():
        raise ConfigError([f"{path}: no such file"], None)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError([f"{path}:{exc.lineno}: invalid JSON: {exc.msg}"], None) from None
        key_lines: dict[str, int] = {}
    else:
        try:
            data = yaml.safe_load(text)
            twice: list[str] = []
            key_lines = _yaml_key_lines(yaml.compose(text), twice=twice)
            if twice:
                raise ConfigError([f"{path}:{problem}" for problem in twice], str(path))
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc)
            raise ConfigError([f"{path}{line}: invalid YAML: {problem}"], None) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: the top level must be a mapping of keys, got {type(data).__name__}"])
    return data, key_lines


def _yaml_key_lines(node: yaml.Node | None, prefix: str = "", twice: list[str] | None = None) -> dict[str, int]:
    """The 1-based line of every dotted key; a key given twice in one mapping (YAML keeps the last,
    silently) is added to `twice` as "LINE: problem"."""
    lines: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            dotted = f"{prefix}{key_node.value}"
            line = key_node.start_mark.line + 1
            if dotted in lines and twice is not None and key_node.value != "<<":
                twice.append(f"{line}: {dotted}: given twice (lines {lines[dotted]} and {line}); keep one")
            lines[dotted] = line
            lines.update(_yaml_key_lines(value_node, dotted + ".", twice))
    return lines


def _apply_override(
    raw: dict[str, Any], dotted: str, value: str, origin: str, origins: dict[str, str], problems: list[str]
) -> None:
    keys = dotted.split(".")
    if not all(keys):
        problems.append(f"{origin}: {dotted!r} is not a dotted key such as train.lr")
        return
    node = raw
    for i, key in enumerate(keys[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            problems.append(f"{origin}: {'.'.join(keys[: i + 1])} is a value, not a section")
            return
        node = child
    try:
        node[keys[-1]] = yaml.safe_load(value) if value.strip() else value
    except yaml.YAMLError:
        node[keys[-1]] = value
    origins[dotted] = origin


def _describe_errors(
    exc: ValidationError,
    raw: dict[str, Any],
    key_lines: dict[str, int],
    origins: dict[str, str],
    source: str | None,
) -> list[str]:
    problems = []
    for error in exc.errors():
        loc = [str(part) for part in error["loc"]]
        dotted = ".".join(loc)
        where = _where(dotted, key_lines, origins, source)
        line = next((key_lines[k] for k in _prefixes(dotted) if k in key_lines), 1 << 30)
        if error["type"] == "extra_forbidden":
            hint = _suggest(loc)
            text = f"{where}{dotted}: unknown key{hint}"
        elif error["type"] == "missing":
            text = f"{where}{dotted}: required, add it to the config or pass {dotted}=..."
        else:
            value = error.get("input")
            shown = f" (got {value!r})" if not isinstance(value, dict) else ""
            text = f"{where}{dotted}: {error['msg']}{shown}"
        problems.append((line, text))
    return [text for _, text in sorted(problems, key=lambda item: item[0])]


def _where(dotted: str, key_lines: dict[str, int], origins: dict[str, str], source: str | None) -> str:
    # Overrides win over the file, so name them first. An override may sit below the failing key
    # (LMFORGE_MODLE__PRESET sets modle.preset; the error is about modle) or above it.
    for key, origin in origins.items():
        if key == dotted or key.startswith(dotted + ".") or dotted.startswith(key + "."):
            return f"{origin}: "
    for key in _prefixes(dotted):
        if key in key_lines and source:
            return f"{source}:{key_lines[key]}: "
    return ""


def _prefixes(dotted: str) -> list[str]:
    parts = dotted.split(".")
    return [".".join(parts[:n]) for n in range(len(parts), 0, -1)]


PEER_NAMES = {
    "learning_rate": "train.lr",
    "lr_scheduler_type": "train.scheduler",
    "per_device_train_batch_size": "train.micro_batch_size",
    "per_device_eval_batch_size": "eval.batch_size",
    "train_batch_size": "train.micro_batch_size",
    "batch_size": "train.micro_batch_size",
    "micro_batch_size": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "num_train_epochs": "train.epochs",
    "num_epochs": "train.epochs",
    "epochs": "train.epochs",
    "max_steps": "train.max_steps",
    "warmup_steps": "train.warmup_steps",
    "warmup_ratio": "train.warmup_ratio",
    "weight_decay": "train.weight_decay",
    "max_grad_norm": "train.max_grad_norm",
    "logging_steps": "train.log_every",
    "eval_steps": "train.eval_every",
    "save_steps": "train.save_every",
    "save_total_limit": "train.keep_last",
    "gradient_checkpointing": "model.gradient_checkpointing",
    "bf16": "train.precision=bf16",
    "fp16": "train.precision=fp16",
    "torch_compile": "train.compile",
    "max_seq_length": "data.max_length",
    "max_seq_len": "data.max_length",
    "sequence_len": "data.max_length",
    "cutoff_len": "data.max_length",
    "max_length": "data.max_length",
    "packing": "data.packing",
    "sample_packing": "data.packing",
    "dataset_text_field": "data.text_field",
    "model_name_or_path": "model.name_or_path",
    "base_model": "model.name_or_path",
    "lora_r": "lora.r",
    "lora_rank": "lora.r",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "lora_target_modules": "lora.target_modules",
    "load_in_4bit": "lora.quantize=4bit",
    "load_in_8bit": "lora.quantize=8bit",
    "report_to": "tracking.backends",
    "run_name": "name",
}
"""Names users bring from the Hugging Face Trainer, TRL, Axolotl and LLaMA-Factory, and lmforge's
setting for each (an unknown key with one of these names, at any level, suggests it)."""


def _suggest(loc: list[str]) -> str:
    """Nearest known key at the same level as an unknown one, as ' (did you mean ...?)'; a peer's
    name for a setting (PEER_NAMES) suggests lmforge's."""
    if loc[-1] in PEER_NAMES and ".".join(loc) != PEER_NAMES[loc[-1]].split("=")[0]:
        return f"; lmforge calls it {PEER_NAMES[loc[-1]]}"
    section: type[BaseModel] = Config
    for part in loc[:-1]:
        field = section.model_fields.get(part)
        annotation = field.annotation if field else None
        sections = [
            a for a in (annotation, *typing.get_args(annotation)) if isinstance(a, type) and issubclass(a, BaseModel)
        ]
        if not sections:  # a value, not a section (an optional section, such as lora, is one)
            return ""
        section = sections[0]
    known = list(section.model_fields)
    match = difflib.get_close_matches(loc[-1], known, n=1, cutoff=0.5)
    if match:
        return f"; did you mean {'.'.join([*loc[:-1], match[0]])}?"
    return f"; known keys here: {', '.join(known)}"


# --------------------------------------------------------------------------- cross-field checks


def check_config(config: Config) -> list[str]:
    """Checks that involve several fields; each problem names the fields and the fix."""
    return (
        _check_model(config)
        + _check_tokenizer(config)
        + _check_rest(config)
        + _check_optimizer(config)
        + _check_curriculum(config)
        + _check_architecture(config)
        + _check_lr_find(config)
        + _check_distributed(config)
    )


def _check_distributed(config: Config) -> list[str]:
    """distributed.strategy against the precision and loss it trains with, and a DeepSpeed JSON file
    against the run's batch sizes. Whether the machine can run the strategy (the deepspeed package)
    is known only where the job runs: lmforge.engine.sharding.check_strategy."""
    dist, train, problems = config.distributed, config.train, []
    if dist.strategy == "fsdp":
        if train.precision == "fp16":
            problems.append(
                "distributed.strategy=fsdp trains in fp32 or bf16: fp16's loss scaling is not supported "
                "with sharded gradients; set train.precision=bf16"
            )
        if isinstance(train.loss_chunk_size, int):
            problems.append(
                "train.loss_chunk_size: the chunked loss reads the output layer's weight outside the model's "
                "forward, where FSDP keeps it sharded; with distributed.strategy=fsdp set it to auto or null "
                "(the plain loss)"
            )
    if dist.deepspeed.config_file is not None and dist.strategy in ("deepspeed", "auto"):
        problems += _check_deepspeed_file(Path(dist.deepspeed.config_file), train)
        both = sorted({"zero_stage", "offload"} & dist.deepspeed.model_fields_set)
        if both:
            problems.append(
                f"distributed.deepspeed: config_file and {' and '.join(both)} are both given, and the file's "
                "zero_optimization would win; set them in one place (the file, or drop config_file)"
            )
    return problems


def _check_deepspeed_file(path: Path, train: TrainConfig) -> list[str]:
    """A DeepSpeed JSON config: readable, an object, a ZeRO stage DeepSpeed knows, and batch sizes that
    are "auto" or those of the run (DeepSpeed refuses a mismatch only once the GPUs are up)."""
    field = "distributed.deepspeed.config_file"
    if not path.is_file():
        return [f"{field}: {path.resolve()}: no such file"]
    try:
        ds = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return [f"{field}: {path}: not valid JSON ({exc})"]
    if not isinstance(ds, dict):
        return [f"{field}: {path}: a DeepSpeed config is a JSON object"]
    problems = []
    zero = ds.get("zero_optimization")
    stage = zero.get("stage", 0) if isinstance(zero, dict) else 0
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        problems.append(
            f"{field}: {path}: zero_optimization.stage is {stage!r}; DeepSpeed's stages are the numbers 0 to 3"
        )
    for key, ours, name in (
        ("train_micro_batch_size_per_gpu", train.micro_batch_size, "train.micro_batch_size"),
        ("gradient_accumulation_steps", train.grad_accum, "train.grad_accum"),
        ("gradient_clipping", train.max_grad_norm or 0.0, "train.max_grad_norm"),
    ):
        value = ds.get(key, "auto")
        if value != "auto" and value != ours:
            problems.append(f'{field}: {path}: {key} is {value!r} but {name} is {ours}: write "auto" there')
    batch, per_process = ds.get("train_batch_size", "auto"), train.micro_batch_size * train.grad_accum
    if batch != "auto" and (not isinstance(batch, int) or isinstance(batch, bool) or batch % per_process):
        problems.append(
            f"{field}: {path}: train_batch_size is {batch!r}; DeepSpeed requires train.micro_batch_size x "
            f'train.grad_accum x processes ({train.micro_batch_size} x {train.grad_accum} x N): write "auto" there'
        )
    for key in ("optimizer", "scheduler"):
        if key in ds:
            problems.append(
                f'{field}: {path}: lmforge builds the {key} (train.{key} and its settings); remove "{key}" '
                "from the DeepSpeed config"
            )
    for key, wanted in (("bf16", train.precision == "bf16"), ("fp16", train.precision == "fp16")):
        enabled = ds.get(key, {}).get("enabled", "auto") if isinstance(ds.get(key), dict) else "auto"
        if enabled != "auto" and train.precision != "auto" and bool(enabled) != wanted:
            problems.append(
                f'{field}: {path}: {key}.enabled is {enabled!r} but train.precision is {train.precision}: write "auto"'
            )
    return problems


def _check_optimizer(config: Config) -> list[str]:
    """train.optimizer and train.scheduler against the settings that belong to one of them, and the
    8-bit optimizers against this machine (they need CUDA and bitsandbytes). Whether a wsd decay
    fits the run is known only with its length: lmforge.engine.optim.check_schedule."""
    train, problems = config.train, []
    owners = {  # setting: (given?, the field that decides, the one value it applies to)
        "momentum": (train.momentum is not None, "optimizer", "sgd"),
        "nesterov": (train.nesterov, "optimizer", "sgd"),
        "num_cycles": (train.num_cycles is not None, "scheduler", "cosine_with_restarts"),
        "power": (train.power is not None, "scheduler", "polynomial"),
        "decay_ratio": (train.decay_ratio is not None, "scheduler", "wsd"),
        "decay_shape": (train.decay_shape is not None, "scheduler", "wsd"),
    }
    for name, (given, field, owner) in owners.items():
        value = getattr(train, field)
        if given and value != owner:
            hint = f"; {value}'s momentum is train.adam_beta1" if name == "momentum" and value != "adafactor" else ""
            problems.append(
                f"train.{name} applies to train.{field}={owner} only, not {value}: remove train.{name} "
                f"or set train.{field}={owner}{hint}"
            )
    problems += _adam_settings(train)
    if train.nesterov and train.optimizer == "sgd" and train.momentum == 0:
        problems.append(
            "train.nesterov needs momentum, but train.momentum is 0: raise train.momentum (e.g. 0.9) "
            "or set train.nesterov=false"
        )
    if train.min_lr_ratio > 0 and train.scheduler == "constant":
        problems.append(
            "train.min_lr_ratio is the floor of a decay, and train.scheduler=constant never decays: remove "
            "train.min_lr_ratio or pick a decaying schedule (linear, cosine, cosine_with_restarts, polynomial, "
            "inverse_sqrt, wsd)"
        )
    if train.optimizer in ("adamw_8bit", "paged_adamw_8bit"):
        import torch

        if not torch.cuda.is_available():
            problems.append(
                f"train.optimizer={train.optimizer} needs a CUDA GPU (bitsandbytes' 8-bit optimizers) and this "
                "machine has none; on CPU use adamw, adafactor, sgd or lion"
            )
        elif importlib.util.find_spec("bitsandbytes") is None:
            problems.append(f"train.optimizer={train.optimizer} needs bitsandbytes: pip install bitsandbytes")
    return problems


def _check_curriculum(config: Config) -> list[str]:
    """data.curriculum against the format, packing and the data it reads."""
    data, curriculum = config.data, config.data.curriculum
    if curriculum is None:
        return []
    problems = []
    if data.order != "shuffle":
        problems.append(
            f"data.order={data.order} conflicts with data.curriculum, which sets the order itself (easy rows "
            "first, then seeded epochs): remove data.order, or remove data.curriculum"
        )
    if curriculum.stages is not None:
        return problems + _check_stages(config)
    if curriculum.column is not None and data.format == "text":
        texts = [path for path in _spec_paths(data.train) if path.lower().endswith((".txt", ".text"))]
        if texts:
            problems.append(
                f"data.curriculum.column={curriculum.column}: the documents of a .txt file have no fields "
                f"({', '.join(texts)}); give the difficulty in .jsonl/.csv/.parquet records, or set "
                "data.curriculum=length to rank them by length"
            )
    return problems


def _check_stages(config: Config) -> list[str]:
    """data.curriculum.stages: what may go with them, their until_step, and data.train."""
    curriculum, problems = config.data.curriculum, []
    stages = curriculum.stages or []
    if curriculum.column is not None:
        problems.append(
            "data.curriculum.stages and data.curriculum.column are exclusive: with stages a row's difficulty "
            "is its stage; remove column, or remove stages to rank the data by column"
        )
    meaningless = [name for name in ("levels", "start", "schedule", "steps") if name in curriculum.model_fields_set]
    if meaningless:
        problems.append(
            f"data.curriculum.{' / '.join(meaningless)} {'does' if len(meaningless) == 1 else 'do'} not apply to "
            "stages (each stage is a level, trained on alone until its until_step); remove "
            f"{'it' if len(meaningless) == 1 else 'them'}"
        )
    if not stages:
        return [
            *problems,
            "data.curriculum.stages is empty: list the stages, e.g. [{data: easy.jsonl, until_step: 100}, "
            "{data: hard.jsonl}]",
        ]
    for i, stage in enumerate(stages[:-1]):
        if stage.until_step is None:
            problems.append(
                f"data.curriculum.stages.{i}.until_step: required (only the last stage may leave it out and train "
                "to the end); give the step this stage ends at"
            )
    ends = [(i, stage.until_step) for i, stage in enumerate(stages) if stage.until_step is not None]
    for (_, before), (i, end) in zip(ends, ends[1:], strict=False):
        if end <= before:
            problems.append(
                f"data.curriculum.stages.{i}.until_step={end} must be above the previous stage's ({before}): "
                "each stage ends after the one before it"
            )
    if _normalized(config.data.train) != _normalized(stages[0].data):
        problems.append(
            f"data.train ({config.data.train}) must name the first stage's data ({stages[0].data}): with "
            "data.curriculum.stages, the stages' data is the training data; set data.train to the first stage's"
        )
    return problems


def _spec_paths(spec: Any) -> list[str]:
    """The paths (or globs) of a data.train-like value."""
    entries = spec if isinstance(spec, list) else [spec]
    return [entry if isinstance(entry, str) else entry.path for entry in entries]


def _normalized(spec: Any) -> list[tuple[str, float]]:
    """A data.train-like value as sorted (normalized path, weight) pairs, to compare two of them."""
    entries = spec if isinstance(spec, list) else [spec]
    pairs = [(entry, 1.0) if isinstance(entry, str) else (entry.path, entry.weight) for entry in entries]
    return sorted((os.path.normpath(os.path.expanduser(path)), weight) for path, weight in pairs)


def _check_architecture(config: Config) -> list[str]:
    """model.architecture, model.config and model.dropout: the family must be a causal LM transformers
    knows, model.config's names fields of its config class, and the sizes complete
    (lmforge.models.build.architecture_problems; imported only for a model that needs it)."""
    from lmforge.models.presets import PRESETS, family

    m = config.model
    given = [f"model.{name}" for name in ("architecture", "config") if getattr(m, name)]
    settings, s = " and ".join(given), "" if len(given) > 1 else "s"
    if m.name_or_path is not None:
        if not given:
            return []  # model.dropout applies to a pretrained model's dropout fields
        return [
            f"{settings} build{s} a new model, and model.name_or_path loads a pretrained one (its config.json says "
            f"its family and fields): remove {settings} or model.name_or_path"
        ]
    if m.task != "causal-lm":
        if not given:
            return []
        return [
            f"{settings} build{s} causal LMs from scratch, not model.task={m.task}: remove {settings} (a new "
            "encoder-decoder is model.preset=t5-tiny with model.task=seq2seq)"
        ]
    if m.preset is not None and m.preset not in PRESETS:
        return []  # said by _check_model
    if family(m.architecture, m.preset) == "llama" and not m.config:
        return []  # llama_config: _check_model checks its sizes, and Llama has attention_dropout
    from lmforge.models.build import architecture_problems

    return architecture_problems(config)


def _adam_settings(train: TrainConfig) -> list[str]:
    """adam_beta1/adam_beta2/adam_eps changed from their defaults for an optimizer that has no use for
    them (sgd and adafactor take none, lion takes the betas only)."""
    takes = {"sgd": (), "adafactor": (), "lion": ("adam_beta1", "adam_beta2")}.get(train.optimizer)
    if takes is None:
        return []
    fields = TrainConfig.model_fields
    changed = [
        name
        for name in ("adam_beta1", "adam_beta2", "adam_eps")
        if name not in takes and getattr(train, name) != fields[name].default
    ]
    return [
        f"train.{name} applies to train.optimizer=adamw (and its 8-bit forms{', lion' if name != 'adam_eps' else ''}) "
        f"only, not {train.optimizer}: remove it"
        for name in changed
    ]


def _check_lr_find(config: Config) -> list[str]:
    """train.lr_find's range goes up."""
    find = config.train.lr_find
    if find.start_lr >= find.end_lr:
        return [
            f"train.lr_find.start_lr ({find.start_lr:g}) must be below train.lr_find.end_lr ({find.end_lr:g}): the "
            "range test raises the learning rate from one to the other (e.g. 1e-7 to 10)"
        ]
    return []


def _check_model(config: Config) -> list[str]:
    from lmforge.models.presets import PRESETS, family

    m, problems = config.model, []
    sizes = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size")
    given = [k for k in sizes if getattr(m, k) is not None]
    if m.name_or_path and (m.preset or given):
        problems.append(
            "model.name_or_path and model.preset/sizes are exclusive: load a pretrained model, "
            "or build one from a preset, not both"
        )
    if m.name_or_path is not None:
        return problems
    if m.preset is not None and m.preset not in PRESETS:
        match = difflib.get_close_matches(m.preset, list(PRESETS), n=1)
        hint = f"; did you mean {match[0]}?" if match else ""
        problems.append(f"model.preset: unknown preset {m.preset!r}{hint} (known: {', '.join(PRESETS)})")
        return problems
    if m.task == "causal-lm" and (family(m.architecture, m.preset) != "llama" or m.config):
        return problems  # sized by the family's config class: _check_architecture
    if m.preset is None and len(set(given) - {"num_kv_heads"}) < 4:
        problems.append(
            "model: give model.name_or_path (a pretrained model), model.preset (one of "
            f"{', '.join(PRESETS)}), or all of hidden_size, num_layers, num_heads, intermediate_size (or "
            "model.architecture and model.config with the family's own size fields)"
        )
        return problems
    arch = resolved_architecture(config)
    if arch["hidden_size"] % arch["num_heads"]:
        problems.append(
            f"model.hidden_size ({arch['hidden_size']}) must be divisible by model.num_heads ({arch['num_heads']})"
        )
    if arch["num_heads"] % arch["num_kv_heads"]:
        problems.append(
            f"model.num_heads ({arch['num_heads']}) must be divisible by model.num_kv_heads ({arch['num_kv_heads']})"
        )
    if config.data.max_length > arch["max_position_embeddings"]:
        problems.append(
            f"data.max_length ({config.data.max_length}) exceeds model.max_position_embeddings "
            f"({arch['max_position_embeddings']}): lower data.max_length or raise model.max_position_embeddings"
        )
    return problems


def _check_tokenizer(config: Config) -> list[str]:
    tok, problems = config.tokenizer, []
    from_scratch = config.model.name_or_path is None
    if from_scratch and not tok.train and tok.path is None:
        problems.append(
            "tokenizer: a model built from scratch needs a tokenizer: set tokenizer.train=true to "
            "train one on the corpus, or tokenizer.path to an existing one"
        )
    if not from_scratch and (tok.train or tok.path):
        problems.append(
            "tokenizer.train/tokenizer.path apply only to models built from scratch; a pretrained "
            "model (model.name_or_path) brings its own tokenizer"
        )
    if tok.train and tok.path:
        problems.append("tokenizer.train and tokenizer.path are exclusive: train a tokenizer or load one")
    return problems


TASK_OF_FORMAT = {"seq2seq": "seq2seq", "classification": "classification"}

EVAL_METRICS = {
    "causal-lm": ("loss", "perplexity", "token_accuracy"),
    "seq2seq": ("loss", "perplexity", "token_accuracy"),
    "classification": ("loss", "accuracy", "macro_f1"),
}
"""What an evaluation of each task produces (eval/<name>, test/<name>); lmforge.eval.evaluate
returns exactly these, and a test holds it to that."""

FORMAT_FIELDS = {
    "text": ("text",),
    "prompt-completion": ("prompt", "completion"),
    "alpaca": ("instruction", "input", "output"),
    "chat": ("messages", "role", "content", "system", "user", "assistant"),
    "seq2seq": ("source", "target"),
    "classification": ("text", "label"),
}
"""The fields each data.format reads, which data.columns may map to other record fields."""

TEMPLATE_FIELD = {"prompt-completion": "prompt", "alpaca": "instruction", "seq2seq": "source"}
"""The formats that take data.template, and the field it must place."""


def _check_task_settings(config: Config) -> list[str]:
    """Settings that name something the task or the format produces or reads, checked against it
    here rather than found missing mid-run."""
    data, problems = config.data, []
    task = config.model.task
    stopping = config.train.early_stopping
    produced = [f"eval/{name}" for name in EVAL_METRICS[task]]
    if stopping is not None and stopping.metric not in produced:
        problems.append(
            f"train.early_stopping.metric: a {task} evaluation does not produce {stopping.metric}; "
            f"use one of {', '.join(produced)}"
        )
    fields = FORMAT_FIELDS[data.format]
    for name in data.columns:
        if name not in fields:
            problems.append(
                f"data.columns.{name}: data.format={data.format} reads no field {name!r}; it reads "
                f"{', '.join(fields)} (map those to your record's fields)"
            )
    problems += _check_template(data)
    only = {
        "chat_template": (data.chat_template != "auto", ("chat",)),
        "text_field": (data.text_field != "text", ("text", "classification")),
        "max_target_length": (data.max_target_length is not None, ("seq2seq",)),
        "loss_on": (data.loss_on != "completion", ("prompt-completion", "alpaca", "chat")),
    }
    for name, (set_, formats) in only.items():
        if set_ and data.format not in formats:
            problems.append(
                f"data.{name} applies to data.format {' / '.join(formats)} only, not {data.format}; remove it"
            )
    if data.labels is not None and len(set(data.labels)) != len(data.labels):
        repeated = sorted({label for label in data.labels if data.labels.count(label) > 1})
        problems.append(f"data.labels: each class once; repeated: {', '.join(repeated)}")
    if config.model.attention == "varlen" and task != "causal-lm":
        problems.append(f"model.attention=varlen applies to causal LMs; remove it for model.task={task}")
    return problems


def _check_template(data: DataConfig) -> list[str]:
    if data.template is None:
        return []
    if data.format not in TEMPLATE_FIELD:
        hint = "; chat formats use data.chat_template" if data.format == "chat" else ""
        return [f"data.template applies to data.format {' / '.join(TEMPLATE_FIELD)} only, not {data.format}{hint}"]
    import string

    try:
        names = {name for _, name, _, _ in string.Formatter().parse(data.template) if name is not None}
    except ValueError as exc:
        return [f"data.template: {exc} in {data.template!r}; a literal brace is written {{{{ or }}}}"]
    field = TEMPLATE_FIELD[data.format]
    if field not in names:
        return [f"data.template: {data.template!r} has no {{{field}}}, so the {field} would never be shown"]
    return []


def _check_rest(config: Config) -> list[str]:
    data, problems = config.data, []
    task = TASK_OF_FORMAT.get(data.format, "causal-lm")
    if task != config.model.task:
        problems.append(
            f"data.format={data.format} trains a {task} model, but model.task is {config.model.task}: "
            f"set model.task={task} or pick a {config.model.task} format"
        )
    if data.packing and task != "causal-lm":
        problems.append(f"data.packing applies to causal LMs only; remove it for data.format={data.format}")
    from lmforge.models.presets import PRESET_TASKS

    preset = config.model.preset
    if config.model.name_or_path is None and config.model.task != PRESET_TASKS.get(preset or "", "causal-lm"):
        problems.append(
            f"model.task={config.model.task} needs model.name_or_path (a pretrained Hugging Face directory)"
            + (" or model.preset=t5-tiny" if config.model.task == "seq2seq" else "")
            + (f"; model.preset={preset} builds a {PRESET_TASKS.get(preset, 'causal-lm')} model" if preset else "")
        )
    for split in ("train", "validation", "test"):
        spec = getattr(data, split)
        if spec is not None and (not spec or (isinstance(spec, str) and not spec.strip())):
            problems.append(f"data.{split} is empty: give a file, a glob or a directory (or a list of them)")
    if data.labels is not None and data.format != "classification":
        problems.append("data.labels applies to data.format=classification only")
    if data.validation is None and data.test is None and data.validation_fraction + data.test_fraction >= 1:
        problems.append("data.validation_fraction + data.test_fraction must be below 1 so that training data remains")
    if data.validation is None and data.validation_fraction == 0:
        problems.append("data: no validation data: give data.validation or a data.validation_fraction above 0")
    if data.on_too_long == "split" and data.format != "text":
        problems.append(
            f"data.on_too_long=split applies to the text format only; for {data.format} use truncate, drop or error"
        )
    return problems + _check_task_settings(config) + _check_train(config) + _check_tracking(config)


def _check_train(config: Config) -> list[str]:
    train, problems = config.train, []
    if train.warmup_steps is not None and train.warmup_ratio is not None:
        problems.append("train.warmup_steps and train.warmup_ratio are exclusive: set only one")
    if train.early_stopping is not None and train.eval_every is None:
        problems.append("train.early_stopping needs train.eval_every: evaluations are what it watches")
    if isinstance(train.loss_chunk_size, int) and train.loss_chunk_size < 1:
        problems.append("train.loss_chunk_size must be a positive number of tokens, auto or null")
    if isinstance(train.loss_chunk_size, int) and config.model.task != "causal-lm":
        problems.append(f"train.loss_chunk_size applies to causal LMs; remove it for model.task={config.model.task}")
    return problems


def _check_tracking(config: Config) -> list[str]:
    problems = []
    if "none" in config.tracking.backends and len(config.tracking.backends) > 1:
        problems.append("tracking.backends: 'none' cannot be combined with other backends")
    if "mlflow" in config.tracking.backends:
        problems += _mlflow_name_problems(config)
    mlflow = config.tracking.mlflow
    for field in ("parent_run_id", "log_model", "register_as"):
        if getattr(mlflow, field) and "mlflow" not in config.tracking.backends:
            problems.append(
                f"tracking.mlflow.{field} needs mlflow in tracking.backends (they are {config.tracking.backends})"
            )
    return problems


def _mlflow_name_problems(config: Config) -> list[str]:
    """The user's names that reach MLflow, checked by MLflow's own rules (its validation
    functions): each tag becomes a tag and a param (tracking.tags.<key>), register_as a model name."""
    tags, name = config.tracking.tags, config.tracking.mlflow.register_as
    if not tags and not name:
        return []  # (importing MLflow's checks takes a second)
    from mlflow.exceptions import MlflowException
    from mlflow.utils import validation

    checks = []
    for key, value in tags.items():
        checks.append((f"tracking.tags.{key}", lambda k=key, v=value: validation._validate_tag(k, str(v))))
        checks.append((f"tracking.tags.{key}", lambda k=key: validation._validate_param_name(f"tracking.tags.{k}")))
    if name:
        checks.append(("tracking.mlflow.register_as", lambda: validation._validate_model_name(name)))
    problems: dict[str, str] = {}
    for where, check in checks:
        try:
            check()
        except MlflowException as exc:
            problems.setdefault(where, f"{where}: MLflow refuses it: {exc.message}")
    return list(problems.values())


def looks_local(name_or_path: str) -> bool:
    """Whether a model name is a path on this machine rather than a Hugging Face Hub id ("org/name"):
    it exists, starts like a path, has other than one slash, or its first part is a local directory
    (models/qwen beside a models/ folder). A local-looking name never goes to the Hub."""
    path = Path(name_or_path).expanduser()
    text = str(name_or_path)
    return (
        path.exists()
        or text.startswith((".", "/", "~", "\\"))
        or text.count("/") != 1
        or Path(text.split("/")[0]).is_dir()
    )


def hub_problems(field: str, repo_id: str) -> list[str]:
    """A Hub id ("org/name") that is neither cached nor reachable, said at once (transformers would
    retry for a minute); the message also names the local directory it is not."""
    from huggingface_hub import constants, model_info, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        return []
    local = (Path.cwd() / repo_id).resolve()
    if constants.HF_HUB_OFFLINE:
        reason = "HF_HUB_OFFLINE is set and it is not in the Hugging Face cache"
    else:
        try:
            model_info(repo_id, timeout=10)
            return []
        except Exception as exc:  # noqa: BLE001 - unreachable, unknown or private: all say the same here
            reason = f"the Hugging Face Hub did not give it ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})"
    return [
        f"{field}: {repo_id!r} is no local directory (looked for {local}) and {reason}; for a local model give "
        f"its path, e.g. ./{repo_id}"
    ]


def check_paths(config: Config) -> list[str]:
    """The files and directories a config names, each checked to exist (relative paths against the
    working directory, which the messages name)."""
    return _data_path_problems(config) + _model_path_problems(config)


def _data_path_problems(config: Config) -> list[str]:
    """data.train/validation/test and the curriculum's stages: files, globs and directories that
    exist, qdrant:// URLs of a valid form (hub: sources are checked when read)."""
    from lmforge.data.qdrant import PREFIX as QDRANT_PREFIX
    from lmforge.data.qdrant import parse as parse_qdrant
    from lmforge.data.sources import HUB_PREFIX, resolve_paths
    from lmforge.errors import DataError

    problems = []
    named = {f"data.{split}": getattr(config.data, split) for split in ("train", "validation", "test")}
    for i, stage in enumerate(config.data.curriculum.stages or [] if config.data.curriculum else []):
        named[f"data.curriculum.stages.{i}.data"] = stage.data
    for field, spec in named.items():
        entries = [] if spec is None else spec if isinstance(spec, list) else [spec]
        for entry in entries:
            path = entry if isinstance(entry, str) else entry.path
            if path.startswith(HUB_PREFIX):
                continue
            try:
                if path.startswith(QDRANT_PREFIX):  # its form and local store here; the server when data is read
                    parse_qdrant(path, field)
                else:
                    resolve_paths(path, field)
            except DataError as exc:
                problems.append(str(exc))
    return problems


def _model_path_problems(config: Config) -> list[str]:
    """model.name_or_path and tokenizer.path: local directories that exist (a model's with a
    config.json of a kind that can do model.task), or Hub ids that are cached or reachable."""
    problems = []
    cwd = Path.cwd()
    for field, value in (("model.name_or_path", config.model.name_or_path), ("tokenizer.path", config.tokenizer.path)):
        if value is None or (field == "model.name_or_path" and value.startswith("s3://")):
            continue  # s3://: read when training starts (publish.push.local_model), with its own errors
        if not looks_local(value):
            problems += hub_problems(field, value)
            continue
        where = (cwd / Path(value).expanduser()).resolve()
        if not where.is_dir():
            problems.append(
                f"{field}: no directory {value!r} (looked for {where}; relative paths are resolved against the "
                "working directory)"
            )
        elif field == "model.name_or_path" and not (where / "config.json").is_file():
            problems.append(f"{field}: {where} is not a Hugging Face model directory (it has no config.json)")
        elif field == "model.name_or_path":
            problems += _task_problems(config, where)
    return problems


def _task_problems(config: Config, where: Path) -> list[str]:
    """A local model whose kind cannot do model.task: a decoder-only model for seq2seq, an
    encoder-decoder for causal-lm (an adapter is judged by its task_type)."""
    try:
        saved = json.loads((where / "config.json").read_text())
    except (OSError, ValueError):
        return []  # loading it says what is wrong
    if (where / "adapter_config.json").is_file():
        return []
    task, kind = config.model.task, saved.get("model_type", "model")
    both_ways = bool(saved.get("is_encoder_decoder"))
    if task == "seq2seq" and not both_ways:
        return [
            f"model.name_or_path: {where} is a {kind} model, not an encoder-decoder: model.task=seq2seq needs one "
            "(T5, BART, ...), or use a causal format (prompt-completion) with model.task=causal-lm"
        ]
    if task == "causal-lm" and both_ways:
        return [
            f"model.name_or_path: {where} is a {kind} encoder-decoder: set model.task=seq2seq (data.format=seq2seq), "
            "or start from a decoder-only model"
        ]
    return []


def resolved_architecture(config: Config, defaults: bool = True) -> dict[str, Any]:
    """The from-scratch sizes: the preset's values overridden by explicit sizes, then (with
    `defaults`) lmforge's defaults for the rest. Without them, what the config gives: a family built
    by model.architecture keeps its own defaults for the others."""
    from lmforge.models.presets import PRESETS

    m = config.model
    arch: dict[str, Any] = dict(PRESETS[m.preset]()) if m.preset else {}
    for key in (
        "hidden_size",
        "num_layers",
        "num_heads",
        "num_kv_heads",
        "intermediate_size",
        "max_position_embeddings",
        "tie_embeddings",
    ):
        value = getattr(m, key)
        if value is not None:
            arch[key] = value
    if not defaults:
        return arch
    arch.setdefault("num_kv_heads", arch.get("num_heads"))
    arch.setdefault("max_position_embeddings", max(2048, config.data.max_length))
    arch.setdefault("tie_embeddings", False)
    return arch


# Settings that may change when a run is resumed: they decide how long, how often and where to
# report, not what the model and data are. Any other difference refuses the resume.
RESUME_SAFE = (
    "name",
    "output_dir",
    "data.cache_dir",
    "data.num_proc",
    "data.prefetch",
    "train.max_steps",
    "train.epochs",
    "train.eval_every",
    "train.log_every",
    "train.save_every",
    "train.keep_last",
    "train.max_time",
    "train.max_bad_steps",
    "train.num_threads",
    "train.mirror",
    "distributed.timeout_minutes",
    "distributed.strategy",  # a sharded checkpoint loads whole and a whole one loads sharded...
    "distributed.fsdp.",  # ...(engine.checkpoint refuses the one pair it cannot)
    "distributed.deepspeed.",
    "storage.",
    "eval.",
    "tracking.",
)


def _resume_safe(key: str) -> bool:
    return any(key == safe or (safe.endswith(".") and key.startswith(safe)) for safe in RESUME_SAFE)


def config_hash(config: Config) -> str:
    """Hash of every setting that defines the model, the data and the optimisation."""
    import hashlib

    identity = {k: v for k, v in flatten(config_to_dict(config)).items() if not _resume_safe(k)}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def resume_differences(saved: Config, new: Config) -> tuple[list[str], list[str]]:
    """(allowed, refused) differences between a checkpoint's config and the one resuming it."""
    old, now = flatten(redacted_dict(saved)), flatten(redacted_dict(new))  # a warning must not print secrets
    allowed, refused = [], []
    for key in sorted(set(old) | set(now)):
        if old.get(key) != now.get(key):
            line = f"{key}: {old.get(key)!r} -> {now.get(key)!r}"
            (allowed if _resume_safe(key) else refused).append(line)
    return allowed, refused


def saved_config(path: str | Path) -> Config:
    """The config a run or checkpoint saved (its config.yaml), as it was resolved then: no
    environment variables or overrides apply."""
    return Config.model_validate(yaml.safe_load(Path(path).read_text()))


def config_to_dict(config: Config) -> dict[str, Any]:
    """The resolved config as plain data, every default filled in."""
    return config.model_dump(mode="json")


def redacted_dict(config: Config) -> dict[str, Any]:
    """The resolved config as plain data with credentials replaced (lmforge.secrets): what is
    saved, printed and logged."""
    from lmforge.secrets import redact

    return redact(config_to_dict(config))


def dump_yaml(config: Config) -> str:
    """The resolved config as YAML, keys in schema order, credentials redacted."""
    return yaml.safe_dump(redacted_dict(config), sort_keys=False, allow_unicode=True)


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1}} -> {"train.lr": 1}; lists are kept as values."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def derived_defaults(config: Config) -> dict[str, str]:
    """What each unset (null) setting that lmforge derives comes to for this config, in words, keyed by
    dotted name (`lmforge config show` writes them as comments): a preset's sizes, the held-out
    splits, the packing, the too-long rule, the cache, evaluation's batch, the CPU threads."""

    data, derived = config.data, _derived_sizes(config)
    for split, fraction in (("validation", data.validation_fraction), ("test", data.test_fraction)):
        if getattr(data, split) is None:
            derived[f"data.{split}"] = f"{fraction:g} of data.train's records held out (data.{split}_fraction)"
    if data.max_target_length is None and data.format == "seq2seq":
        derived["data.max_target_length"] = f"{data.max_length} (data.max_length)"
    if data.on_too_long is None:
        derived["data.on_too_long"] = f"{data.too_long} (for data.format={data.format})"
    if data.packing is None:
        derived["data.packing"] = f"{str(data.packs).lower()} (for data.format={data.format})"
    if data.cache_dir is None:
        derived["data.cache_dir"] = os.path.join("~", ".cache", "lmforge")
    if data.labels is None and data.format == "classification":
        derived["data.labels"] = "the sorted labels of the training data"
    if config.eval.batch_size is None:
        derived["eval.batch_size"] = f"{config.train.micro_batch_size} (train.micro_batch_size)"
    if config.train.num_threads is None:
        from lmforge.engine.threads import default_threads

        derived["train.num_threads"] = "{} ({})".format(*default_threads())
    return derived


def _derived_sizes(config: Config) -> dict[str, str]:
    """The sizes of a causal LM built from scratch that its preset (or lmforge's defaults, for a Llama)
    gives, in words, keyed by dotted name."""
    from lmforge.models.presets import PRESETS, family

    m, derived = config.model, {}
    if m.name_or_path is not None or m.task != "causal-lm" or (m.preset is not None and m.preset not in PRESETS):
        return derived
    llama = family(m.architecture, m.preset) == "llama" and not m.config
    given = PRESETS[m.preset]() if m.preset else {}
    for key, value in resolved_architecture(config, defaults=llama).items():
        if getattr(m, key) is None:
            shown = str(value).lower() if isinstance(value, bool) else str(value)
            derived[f"model.{key}"] = f"{shown} (model.preset {m.preset})" if key in given else shown
    return derived


def with_derived_comments(text: str, derived: dict[str, str]) -> str:
    """`dump_yaml`'s text with '  # <value>' after each null setting that `derived` names (block-style
    YAML, two spaces a level, as dump_yaml writes it)."""
    path: list[str] = []
    lines = []
    for line in text.splitlines():
        key = re.match(r"^( *)([A-Za-z_][\w-]*):(.*)$", line)
        if key:
            depth = len(key.group(1)) // 2
            path[depth:] = [key.group(2)]
            note = derived.get(".".join(path))
            if note is not None and key.group(3).strip() == "null":
                line = f"{line}  # {note}"
        lines.append(line)
    return "\n".join(lines) + "\n"
