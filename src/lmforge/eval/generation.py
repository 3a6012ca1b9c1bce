"""Sampling text from a model, without disturbing the training random state."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from lmforge.config import GenerateConfig
from lmforge.data.formats import Segment
from lmforge.data.tokenize import adds_bos, encode_marked, ids_with_eos, prompt_ids
from lmforge.errors import UserError


@dataclass(frozen=True)
class Prompt:
    """A prompt to sample from: its text and, for a causal LM, the ids training would have put
    before the answer (`tokenize.prompt_ids`); None for a free prompt or an encoder-decoder."""

    text: str
    reference: str | None = None
    ids: tuple[int, ...] | None = None
    covered: int | None = None
    """How many characters of `text` the ids hold; the rest is the model's to write."""


def prompts_and_references(
    samples: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase, cfg: GenerateConfig
) -> list[Prompt]:
    """Prompts to sample from: the configured ones, else held-out records: their prompt and true
    completion, or for plain text the opening tokens of the document and its continuation.

    For a causal LM each held-out prompt's ids are the training row's tokens before the first
    trained one (the record's own answer decides where the boundary lies)."""
    if cfg.prompts:
        return [Prompt(p) for p in cfg.prompts[: cfg.num_examples]]
    return [held_out_prompt(sample, tokenizer, cfg) for sample in samples[: cfg.num_examples]]


def held_out_prompt(sample: dict[str, str], tokenizer: PreTrainedTokenizerBase, cfg: GenerateConfig) -> Prompt:
    """The prompt of one held-out record (`tokenize.prompt_and_reference`'s sample): its prompt and
    true completion, or a document's first `cfg.prompt_tokens` tokens and their continuation."""
    add_bos = adds_bos(tokenizer)
    if "prompt" not in sample:  # a document: its first tokens as the training row has them
        ((ids, _),) = encode_marked([[Segment(sample["text"], True)]], tokenizer, add_bos)
        ids = ids.tolist()
        cut = cfg.prompt_tokens + (len(ids) > 0 and add_bos and ids[0] == tokenizer.bos_token_id)
        text = tokenizer.decode(ids[:cut], skip_special_tokens=True)
        reference = tokenizer.decode(ids[cut : cut + cfg.max_new_tokens], skip_special_tokens=True)
        return Prompt(text, reference, tuple(ids[:cut]), len(text))
    # (an encoder-decoder or a classifier ignores the ids)
    ids, covered = prompt_ids(sample["prompt"], tokenizer, add_bos, [sample["reference"]])
    return Prompt(sample["prompt"], sample["reference"], tuple(ids), covered)


HINTS_FILE = "lmforge_generation.json"
"""Beside a model lmforge saved: how to prompt it as trained ({"answer_starts": [...], "stop": [...]})."""


def generation_hints(samples: list[dict[str, str]], stop: list[str]) -> dict[str, list[str]]:
    """What a prompt whose answer is unknown needs to be encoded and ended as training did: the
    starts of held-out answers (whether the vocabulary joins a template's trailing space to them)
    and the end-of-turn marker of a chat template."""
    starts = [s["reference"][:8] for s in samples if s.get("reference")][:16]
    return {"answer_starts": starts, "stop": stop}


def hints_of(data, config) -> dict[str, list[str]]:
    """`generation_hints` of prepared data (a PreparedData) trained as `config` says."""
    from lmforge.data.formats import turn_end

    chat = config.data.format == "chat" and getattr(data.tokenizer, "chat_template", None)
    stop = [end] if chat and (end := turn_end(data.tokenizer)) else []
    return generation_hints(data.samples, stop)


def read_hints(model_dir: Path) -> dict[str, list[str]]:
    path = Path(model_dir) / HINTS_FILE
    return json.loads(path.read_text()) if path.is_file() else {"answer_starts": [], "stop": []}


def model_inputs(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompt: Prompt | str, answer_starts: list[str] | None = None
) -> tuple[list[int], int]:
    """(ids, characters of the prompt text they hold) as the model saw such inputs in training:
    the encoder's input for a seq2seq model, the training row's prefix for a causal LM (for a
    prompt without ids, as answers like `answer_starts` would have cut it)."""
    prompt = Prompt(prompt) if isinstance(prompt, str) else prompt
    if model.config.is_encoder_decoder:
        return ids_with_eos(prompt.text, tokenizer), len(prompt.text)
    if prompt.ids is not None:
        return list(prompt.ids), len(prompt.text) if prompt.covered is None else prompt.covered
    return prompt_ids(prompt.text, tokenizer, adds_bos(tokenizer), answer_starts)


@dataclass(frozen=True)
class Generated:
    text: str
    """The new text (as `generate` returns it)."""
    new_tokens: int
    """Tokens the model wrote, its end-of-sequence token included."""
    hit_limit: bool
    """Cut by max_new_tokens: no end of sequence, no stop string."""


@torch.no_grad()
def generate_each(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[Prompt | str],
    cfg: GenerateConfig,
    seed: int = 0,
    answer_starts: list[str] | None = None,
    batch_size: int = 1,
    generate_kwargs: dict | None = None,
) -> list[Generated]:
    """Continue each prompt; each output's text is only the new text: what follows the prompt's text
    (a part of the prompt that training put inside the answer's first token, such as a template's
    trailing space, is written by the model and not repeated).

    Runs under a forked RNG seeded by `seed`, so sampling gives the same text every time and leaves
    the random streams of training untouched. `batch_size` prompts go to each call of the model's
    `generate`.

    A batch's prompts are padded on the left for a decoder-only model (on the right for an
    encoder-decoder's encoder), with an attention mask; greedy answers are the same as one prompt
    at a time up to float rounding. Sampled answers depend on the batch size (the random draws are
    shared out differently), so samples stay at one prompt per call.

    `generate_kwargs` go to every call of `generate` as they are: a `streamer` that receives each
    new token, `stopping_criteria` that end it early (`lmforge serve`).
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    outputs = []
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for first in range(0, len(prompts), batch_size):
            batch = prompts[first : first + batch_size]
            outputs += _generate_batch(model, tokenizer, batch, cfg, answer_starts, generate_kwargs or {})
    model.train(was_training)
    return outputs


def _generate_batch(
    model, tokenizer, prompts: list[Prompt | str], cfg: GenerateConfig, answer_starts, generate_kwargs: dict
) -> list[Generated]:
    device = next(model.parameters()).device
    encoder_decoder = model.config.is_encoder_decoder
    inputs = [model_inputs(model, tokenizer, prompt, answer_starts) for prompt in prompts]
    rows = [ids or [tokenizer.eos_token_id] for ids, _ in inputs]  # an empty prompt starts from a document boundary
    width = max(len(ids) for ids in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, ids in enumerate(rows):
        span = slice(0, len(ids)) if encoder_decoder else slice(width - len(ids), width)
        input_ids[i, span] = torch.tensor(ids)
        attention_mask[i, span] = 1
    out = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        max_new_tokens=cfg.max_new_tokens,
        do_sample=cfg.temperature > 0,
        temperature=cfg.temperature if cfg.temperature > 0 else None,
        top_k=(cfg.top_k or 0) if cfg.temperature > 0 else None,  # 0: no top-k (None would be transformers' 50)
        top_p=cfg.top_p if cfg.temperature > 0 else None,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        # one process generates with a whole model: after a ZeRO-3 job transformers would wait for the others
        synced_gpus=False,
        **({"stop_strings": cfg.stop, "tokenizer": tokenizer} if cfg.stop else {}),
        **generate_kwargs,
    )
    new = (out[:, 1:] if encoder_decoder else out[:, width:]).tolist()  # an encoder-decoder's start token goes
    results = []
    for prompt, (_, covered), tokens in zip(prompts, inputs, new, strict=True):
        ended = tokenizer.eos_token_id in tokens
        written = tokens[: tokens.index(tokenizer.eos_token_id) + 1] if ended else _unpadded(tokens, tokenizer)
        left = (prompt if isinstance(prompt, str) else prompt.text)[covered:]  # the model wrote it
        text = strip_prompt_tail(tokenizer.decode(written, skip_special_tokens=True), left)
        cut = cut_at_stop(text, cfg.stop)
        hit_limit = not ended and len(written) >= cfg.max_new_tokens and cut == text
        results.append(Generated(cut, len(written), hit_limit))
    return results


def _unpadded(tokens: list[int], tokenizer) -> list[int]:
    """A finished row of a batch is padded to the longest: the padding after what it wrote goes."""
    end = len(tokens)
    while end and tokens[end - 1] == tokenizer.pad_token_id:
        end -= 1
    return tokens[:end]


def strip_prompt_tail(text: str, tail: str) -> str:
    """`text` without `tail` in front: the end of the prompt that training put inside the answer's
    first token (a template's trailing space), which the model writes again; `text` as it is when it
    does not start with it."""
    return text.removeprefix(tail) if tail and text.startswith(tail) else text


def cut_at_stop(text: str, stop: list[str]) -> str:
    """`text` up to the first of the stop strings (generation halts on the token that completes one)."""
    ends = [i for i in (text.find(s) for s in stop) if i >= 0]
    return text[: min(ends)] if ends else text


def as_trained(prompt: str, run_config, tokenizer, chat: bool, system: str | None = None) -> str:
    """`prompt` rendered as the run's training data was: a user message through the chat template
    the tokenizer carries (chat data, or `chat`), the run's data.template (prompt-completion,
    alpaca, seq2seq); plain text otherwise.

    Raises:
        UserError: `chat` for a tokenizer without a chat template, or a template that needs more
            fields than the prompt.
    """
    from lmforge.data.formats import FORMATS, FormatProblem, column

    data = run_config.data if run_config is not None else None
    if chat or (data is not None and data.format == "chat"):
        if not getattr(tokenizer, "chat_template", None):
            raise UserError("--chat: this model's tokenizer has no chat template (it was not trained on chat data)")
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": prompt})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if data is None or data.format not in ("prompt-completion", "alpaca", "seq2seq"):
        return prompt
    field, answer = {"prompt-completion": ("prompt", "completion"), "alpaca": ("instruction", "output")}.get(
        data.format, ("source", "target")
    )
    try:
        segments = FORMATS[data.format]({column(data, field): prompt, column(data, answer): "x"}, data, tokenizer)
    except FormatProblem as problem:
        raise UserError(f"cannot render the prompt with the run's data.template: {problem}; pass --raw") from None
    return segments[0].text


@torch.no_grad()
def predict_labels(model: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[str]:
    """The class a classifier gives each text, by name."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    names = []
    limit = min(getattr(model.config, "max_position_embeddings", None) or 1 << 30, tokenizer.model_max_length)
    for text in texts:
        encoded = tokenizer(text, return_tensors="pt", truncation=True, max_length=limit).to(device)
        names.append(model.config.id2label[int(model(**encoded).logits.argmax(-1))])
    model.train(was_training)
    return names


def respond(
    model, tokenizer, prompts: list[Prompt | str], cfg: GenerateConfig, seed: int, hints: dict | None = None
) -> list[str]:
    """What the model makes of each prompt: a continuation, a target sequence, or a class name.

    Args:
        hints: `read_hints` of the model's directory: how free prompts are cut, where answers stop.
    """
    if getattr(model.config, "id2label", None) and type(model).__name__.endswith("ForSequenceClassification"):
        return predict_labels(model, tokenizer, [p if isinstance(p, str) else p.text for p in prompts])
    hints = hints or {}
    if hints.get("stop"):
        cfg = cfg.model_copy(update={"stop": [*cfg.stop, *(s for s in hints["stop"] if s not in cfg.stop)]})
    return [g.text for g in generate_each(model, tokenizer, prompts, cfg, seed, hints.get("answer_starts"))]
