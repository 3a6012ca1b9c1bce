"""The model `lmforge serve` answers with: loaded as `lmforge generate` loads it, prompted as it was
trained (the run's prompt or chat template, the stop strings and answer starts of its
lmforge_generation.json), one generation at a time.

Generation runs in a worker thread (never on the event loop) behind one lock: requests queue for
it in arrival order, more or less (a lock promises no order). Each generation checks a
cancellation flag before every new token, so a client that goes away stops its generation at the
next token, and a queued request whose client left never starts.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from lmforge.config import GenerateConfig
from lmforge.errors import UserError
from lmforge.eval.generation import (
    Prompt,
    as_trained,
    cut_at_stop,
    generate_each,
    model_inputs,
    read_hints,
    strip_prompt_tail,
)
from lmforge.serve.protocol import APIError

DEFAULT_COMPLETION_TOKENS = 16
"""max_tokens of a completion that does not say (OpenAI's default)."""
DEFAULT_CHAT_TOKENS = 512
"""max_completion_tokens of a chat completion that does not say, when the context leaves that much."""
LOG_SIZE = 1000
"""Finished generations kept in `ServedModel.log`."""
CHARS_PER_TOKEN = 32
"""More characters than any token of a real vocabulary holds (most hold under 8): a prompt longer
than the context times this cannot fit, and is refused before it is tokenized (which takes memory
and time in proportion to its length)."""
UNBOUNDED_CONTEXT = 16384
"""Tokens assumed for that bound when the model sets no context limit (T5's relative positions)."""


@dataclass
class Job:
    """One generation, prepared (and its prompt counted) before it waits for the model."""

    prompt: Prompt
    prompt_tokens: int
    cfg: GenerateConfig
    seed: int
    answer_starts: list[str] | None
    cancel: threading.Event = field(default_factory=threading.Event)
    """Set when the client goes away: the generation stops before its next token."""


@dataclass(frozen=True)
class Answer:
    text: str
    prompt_tokens: int
    completion_tokens: int
    """Tokens the model wrote, its end-of-sequence token included."""
    finish_reason: str
    """stop (end of sequence or a stop string), length (max_tokens) or cancelled (the client left)."""


class ServedModel:
    """A loaded model with its tokenizer, the run's config (None for a bare model directory) and its
    generation hints, under the name clients ask for.

    Attributes:
        task: causal-lm, seq2seq or classification.
        context: the longest input in tokens (prompt plus answer for a causal LM; the encoder's
            input for a seq2seq model; a classifier's text), None when the model sets no limit.
        log: the latest finished generations, newest last: {"prompt_tokens", "completion_tokens",
            "finish_reason", "seconds"} each (what a test or an operator reads; never a prompt).
    """

    def __init__(self, model, tokenizer, run_config, hints: dict, name: str, raw: bool = False) -> None:
        self.model, self.tokenizer, self.run_config, self.hints = model, tokenizer, run_config, hints
        self.name = name
        self.raw = raw
        self.task = task_of_model(model)
        self.context = context_length(model, tokenizer)
        self.log: deque[dict] = deque(maxlen=LOG_SIZE)
        self._lock = threading.Lock()
        model.eval()

    @classmethod
    def load(cls, target: Path, name: str | None = None, raw: bool = False) -> ServedModel:
        """The model `target` names (anything `lmforge generate` takes), on the first GPU if there is one.

        Args:
            name: what clients call it; default `default_name(target)`.
            raw: completions continue the prompt as given instead of through the run's template.

        Raises:
            UserError: `target` is not a run, checkpoint or model directory.
        """
        from lmforge.eval.target import load_target, model_dir_of

        model, tokenizer, run_config = load_target(Path(target))
        if torch.cuda.is_available():
            model.to("cuda")
        hints = read_hints(model_dir_of(Path(target)))
        return cls(model, tokenizer, run_config, hints, name or default_name(target), raw)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def completion_prompt(self, prompt: str) -> str:
        """`prompt` as `lmforge generate` sends it: through the run's template (or as given with raw).

        Raises:
            APIError: a run template the prompt cannot fill.
        """
        if self.raw:
            return prompt
        try:
            return as_trained(prompt, self.run_config, self.tokenizer, chat=False)
        except UserError as exc:
            raise APIError(400, f"{exc} (start the server with --raw to send prompts as given)", "prompt") from None

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """The messages through the model's chat template, with the assistant's turn opened.

        Raises:
            APIError: messages the template refuses (roles out of its order, say), with its reason.
        """
        from jinja2 import TemplateError

        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except TemplateError as exc:
            raise APIError(400, f"the model's chat template refuses these messages: {exc}", "messages") from None

    def stop_strings(self, chat: bool) -> list[str]:
        """Where answers end besides the end of sequence: the chat template's turn end."""
        from lmforge.data.formats import turn_end

        if self.raw and not chat:
            return []
        stops = list(self.hints.get("stop", []))
        if chat and not stops and (end := turn_end(self.tokenizer)):  # a chat model lmforge did not train
            stops = [end]
        return stops

    def job(self, text: str, request, chat: bool) -> Job:
        """A generation of `text` (the rendered prompt) as `request` (a CompletionRequest or a
        ChatRequest) asks, counted and checked against the context.

        Raises:
            APIError: the prompt, or the prompt and the answer's max_tokens, do not fit the context.
        """
        starts = None if self.raw and not chat else self.hints.get("answer_starts")
        ids, covered = model_inputs(self.model, self.tokenizer, text, starts)
        prompt = Prompt(text) if self.task == "seq2seq" else Prompt(text, ids=tuple(ids), covered=covered)
        if chat:
            names, default = ("messages", request.limit_param()), DEFAULT_CHAT_TOKENS
        else:
            names, default = ("prompt", "max_tokens"), DEFAULT_COMPLETION_TOKENS
        limit = self._answer_limit(len(ids), request.limit() if chat else request.max_tokens, default, *names)
        cfg = GenerateConfig(
            max_new_tokens=limit,
            temperature=request.temperature,
            top_k=None,
            top_p=request.top_p if request.top_p < 1 else None,
            stop=[*request.stop, *(s for s in self.stop_strings(chat) if s not in request.stop)],
        )
        seed = request.seed if request.seed is not None else secrets.randbelow(2**31)
        return Job(prompt, len(ids), cfg, seed, starts)

    def _answer_limit(self, prompt_tokens: int, max_tokens: int | None, default: int, prompt: str, limit: str) -> int:
        """The answer's token limit: the request's, else `default` or what the context leaves.

        Args:
            prompt, limit: the request's names of the prompt and of max_tokens, for the error.

        Raises:
            APIError: the prompt does not fit the context, or the prompt and max_tokens do not.
        """
        if self.context is None:
            return max_tokens or default
        if self.task == "seq2seq":  # the context bounds the encoder's input; the decoder writes on
            if prompt_tokens > self.context:
                raise APIError(400, _too_long(self.context, prompt_tokens, None), prompt, "context_length_exceeded")
            return max_tokens or default
        room = self.context - prompt_tokens
        if room < 1:
            raise APIError(400, _too_long(self.context, prompt_tokens, None), prompt, "context_length_exceeded")
        if max_tokens is not None and max_tokens > room:
            raise APIError(400, _too_long(self.context, prompt_tokens, max_tokens), limit, "context_length_exceeded")
        return max_tokens or min(default, room)

    def run(self, job: Job, on_text: Callable[[str], None] | None = None) -> Answer:
        """Generate `job`'s answer once the model is free (call it from a worker thread).

        Args:
            on_text: called with each new piece of the answer as it settles; the pieces add up to
                the answer's text.
        """
        with self._lock:
            started = time.perf_counter()
            if job.cancel.is_set():  # its client left while it waited
                return self._finished(job, "", 0, "cancelled", started)
            kwargs: dict = {"stopping_criteria": StoppingCriteriaList([_Cancelled(job.cancel)])}
            stream = None
            if on_text is not None:
                tail = job.prompt.text[job.prompt.covered :] if job.prompt.covered is not None else ""
                kwargs["streamer"] = stream = TextStream(self.tokenizer, tail, job.cfg.stop, on_text)
            (generated,) = generate_each(
                self.model, self.tokenizer, [job.prompt], job.cfg, job.seed, job.answer_starts, generate_kwargs=kwargs
            )
            if stream is not None:
                stream.finish(generated.text)
            reason = "cancelled" if job.cancel.is_set() else "length" if generated.hit_limit else "stop"
            return self._finished(job, generated.text, generated.new_tokens, reason, started)

    def _finished(self, job: Job, text: str, tokens: int, reason: str, started: float) -> Answer:
        seconds = round(time.perf_counter() - started, 4)
        record = {"prompt_tokens": job.prompt_tokens, "completion_tokens": tokens, "finish_reason": reason}
        self.log.append({**record, "seconds": seconds})
        return Answer(text, job.prompt_tokens, tokens, reason)

    @property
    def max_chars(self) -> int:
        """The longest prompt, in characters, that is tokenized at all (`CHARS_PER_TOKEN`)."""
        return (self.context or UNBOUNDED_CONTEXT) * CHARS_PER_TOKEN

    def check_chars(self, texts: list[str], param: str) -> None:
        """Refuse, before tokenizing, a text too long for the context whatever its tokens.

        Args:
            texts: the request's texts, each tokenized on its own (the chat messages joined).
            param: the request's name for them (prompt, messages, input), for the error.

        Raises:
            APIError: a text over `max_chars` characters, naming which, its length and the limit.
        """
        for i, text in enumerate(texts):
            if len(text) > self.max_chars:
                where = param if len(texts) == 1 else f"{param}[{i}]"
                tokens = f"{self.context} tokens" if self.context else f"unbounded, {UNBOUNDED_CONTEXT} tokens assumed"
                message = (
                    f"{where} is {len(text)} characters; this model's context ({tokens}) cannot hold more than "
                    f"{self.max_chars} characters, so the server refuses longer prompts unread: shorten it"
                )
                raise APIError(400, message, param, "context_length_exceeded")

    def check_inputs(self, texts: list[str]) -> list[list[int]]:
        """A classifier's inputs, encoded.

        Raises:
            APIError: a text longer than the model's context, naming which.
        """
        encoded = [self.tokenizer(text, truncation=False)["input_ids"] for text in texts]
        for i, ids in enumerate(encoded):
            if self.context is not None and len(ids) > self.context:
                where = "input" if len(texts) == 1 else f"input[{i}]"
                message = f"{where} is {len(ids)} tokens; this model reads at most {self.context}: shorten it"
                raise APIError(400, message, "input", "context_length_exceeded")
        return encoded

    @torch.no_grad()
    def classify(self, encoded: list[list[int]]) -> list[dict]:
        """Each input's class and the probability of every class (call it from a worker thread).

        Returns:
            {"index", "label", "probabilities": {label: p}} per input, in order.
        """
        config = self.model.config
        labels = [config.id2label[i] for i in range(len(config.id2label))]
        device = next(self.model.parameters()).device
        results = []
        with self._lock:
            for index, ids in enumerate(encoded):
                logits = self.model(input_ids=torch.tensor([ids], device=device)).logits[0]  # (classes,)
                probabilities = torch.softmax(logits.float(), dim=-1).tolist()
                best = max(range(len(labels)), key=probabilities.__getitem__)
                chances = dict(zip(labels, probabilities, strict=True))
                results.append({"index": index, "label": labels[best], "probabilities": chances})
        return results


def _too_long(context: int, prompt: int, max_tokens: int | None) -> str:
    if max_tokens is None:
        return f"This model's maximum context length is {context} tokens; the prompt alone is {prompt}: shorten it."
    return (
        f"This model's maximum context length is {context} tokens. However, you requested {prompt + max_tokens} "
        f"tokens ({prompt} in the prompt, {max_tokens} for the completion). Please reduce the prompt or max_tokens."
    )


def task_of_model(model) -> str:
    """causal-lm, seq2seq or classification, from the loaded model (a PeftModel names its base's class)."""
    if type(model).__name__.endswith("ForSequenceClassification"):
        return "classification"
    return "seq2seq" if model.config.is_encoder_decoder else "causal-lm"


def context_length(model, tokenizer) -> int | None:
    """The model's longest input in tokens: its position table, or its tokenizer's limit when that is
    a real one (tokenizers without one say 1e30); None for a model with neither (T5's relative
    positions)."""
    positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    limit = tokenizer.model_max_length if tokenizer.model_max_length < 1_000_000 else None
    known = [n for n in (positions, limit) if n]
    return min(known) if known else None


def default_name(target: Path) -> str:
    """What clients call the model by default: the name the user gave (runs/tiny-latest serves as
    tiny-latest), or the run's for a final/ directory."""
    path = Path(target).absolute()
    return path.parent.name if path.name == "final" else path.name


class _Cancelled(StoppingCriteria):
    """Ends generation at the next token once `event` is set."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class TextStream(BaseStreamer):
    """Receives `generate`'s tokens (one row) and hands `on_text` each new piece of the answer once
    it cannot change: the answer so far is decoded and made as `generate_each` makes the final
    text (the prompt's tail dropped, cut at a stop string), then what may still change is held
    back: a character still missing bytes, trailing white space (decoding may clean it up), and an
    end that could be the start of a stop string. `finish` sends the rest of the final text.
    """

    def __init__(self, tokenizer, tail: str, stop: list[str], on_text: Callable[[str], None]) -> None:
        self.tokenizer, self.tail, self.stop, self.on_text = tokenizer, tail, stop, on_text
        self.tokens: list[int] = []
        self.sent = ""
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate's first call passes the prompt (or the decoder's start)
            self._prompt_seen = True
            return
        self.tokens += value.reshape(-1).tolist()
        eos = self.tokenizer.eos_token_id
        written = self.tokens[: self.tokens.index(eos) + 1] if eos in self.tokens else self.tokens
        self._send(self.settled(self.tokenizer.decode(written, skip_special_tokens=True)))

    def end(self) -> None:
        """(generate's end; the final text comes with `finish`)."""

    def settled(self, decoded: str) -> str:
        """The part of the answer in `decoded` (the tokens so far) that later tokens cannot change."""
        if self.tail and self.tail.startswith(decoded):
            return ""  # it may yet turn out to be the prompt's tail, which is not answer
        text = cut_at_stop(strip_prompt_tail(decoded, self.tail), self.stop).rstrip("\ufffd")
        text = text.rstrip()
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:size]):
                    text = text[:-size]
                    break
        return text

    def finish(self, text: str) -> None:
        """Send what the final `text` adds to what was sent."""
        self._send(text)

    def _send(self, text: str) -> None:
        if len(text) > len(self.sent) and text.startswith(self.sent):
            self.on_text(text[len(self.sent) :])
            self.sent = text
