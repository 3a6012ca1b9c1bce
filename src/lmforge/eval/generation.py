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
    add_bos = adds_bos(tokenizer)
    prompts = []
    for sample in samples[: cfg.num_examples]:
        if "prompt" not in sample:  # a document: its first tokens as the training row has them
            ((ids, _),) = encode_marked([[Segment(sample["text"], True)]], tokenizer, add_bos)
            ids = ids.tolist()
            cut = cfg.prompt_tokens + (len(ids) > 0 and add_bos and ids[0] == tokenizer.bos_token_id)
            text = tokenizer.decode(ids[:cut], skip_special_tokens=True)
            reference = tokenizer.decode(ids[cut : cut + cfg.max_new_tokens], skip_special_tokens=True)
            prompts.append(Prompt(text, reference, tuple(ids[:cut]), len(text)))
        else:  # (an encoder-decoder or a classifier ignores the ids)
            ids, covered = prompt_ids(sample["prompt"], tokenizer, add_bos, [sample["reference"]])
            prompts.append(Prompt(sample["prompt"], sample["reference"], tuple(ids), covered))
    return prompts


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


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[Prompt | str],
    cfg: GenerateConfig,
    seed: int = 0,
    answer_starts: list[str] | None = None,
) -> list[str]:
    """Continue each prompt; return only the new text: what follows the prompt's text (a part of
    the prompt that training put inside the answer's first token, such as a template's trailing
    space, is written by the model and not repeated).

    Runs under a forked RNG seeded by `seed`, so sampling gives the same text every time and leaves
    the random streams of training untouched.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    outputs = []
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for prompt in prompts:
            ids, covered = model_inputs(model, tokenizer, prompt, answer_starts)
            if not ids:  # an empty prompt starts from a document boundary
                ids = [tokenizer.eos_token_id]
            input_ids = torch.tensor([ids], device=device)
            out = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=cfg.max_new_tokens,
                do_sample=cfg.temperature > 0,
                temperature=cfg.temperature if cfg.temperature > 0 else None,
                top_k=cfg.top_k if cfg.temperature > 0 else None,
                top_p=cfg.top_p if cfg.temperature > 0 else None,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                **({"stop_strings": cfg.stop, "tokenizer": tokenizer} if cfg.stop else {}),
            )
            new = out[0] if model.config.is_encoder_decoder else out[0, input_ids.shape[1] :]
            text = tokenizer.decode(new, skip_special_tokens=True)
            left = (prompt if isinstance(prompt, str) else prompt.text)[covered:]  # the model wrote it
            text = text.removeprefix(left) if left and text.startswith(left) else text
            outputs.append(cut_at_stop(text, cfg.stop))
    model.train(was_training)
    return outputs


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
    return generate(model, tokenizer, prompts, cfg, seed=seed, answer_starts=hints.get("answer_starts"))
