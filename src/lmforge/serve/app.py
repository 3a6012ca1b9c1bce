"""The HTTP side of `lmforge serve`: the FastAPI app and the uvicorn server that runs it.

Endpoints: GET /health (open even with an API key), GET /v1/models, GET /v1/models/{name},
POST /v1/completions, POST /v1/chat/completions (both with stream: true as server-sent events
ending in `data: [DONE]`), POST /v1/classify (classifiers).

Every refused request is a 4xx with OpenAI's error body: a body over the size limit a 413 before
any of it is parsed, a prompt that cannot fit the model's context a 400 before it is tokenized, a
string that is not Unicode text a 400 naming the field. An unexpected failure is a 500 with that
body and one line in the server's log, never a traceback to the client. The API key is compared
in constant time and never written anywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
import traceback
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from lmforge.errors import UserError
from lmforge.secrets import REDACTED, redact_text
from lmforge.serve.model import Answer, Job, ServedModel
from lmforge.serve.protocol import (
    APIError,
    ChatRequest,
    ClassifyRequest,
    CompletionRequest,
    chat_body,
    chat_chunk,
    completion_body,
    error_body,
    new_id,
    usage,
    usage_chunk,
)

OPEN_PATHS = frozenset({"/health"})
"""Paths that need no API key."""
DEFAULT_MAX_REQUEST_MB = 8.0
"""The largest request body `lmforge serve` reads, in MiB (--max-request-mb)."""
logger = logging.getLogger("lmforge.serve")


def create_app(
    served: ServedModel, api_key: str | None = None, max_request_mb: float = DEFAULT_MAX_REQUEST_MB
) -> FastAPI:
    """The OpenAI-compatible app answering with `served`.

    Args:
        api_key: clients must send `Authorization: Bearer <api_key>` (except to /health); None: open.
        max_request_mb: a request body larger than this (MiB) is refused with 413 unread.

    `app.state.served` is the model; its `log` records every finished generation (tokens, finish
    reason: cancelled when the client left).
    """
    app = FastAPI(title="lmforge serve", summary=f"OpenAI-compatible API for {served.name}")
    app.state.served = served
    # (the last added runs first: a failure anywhere is a 500, the key is checked before the body is read)
    app.add_middleware(BodyLimit, max_mb=max_request_mb)
    if api_key is not None:
        app.add_middleware(BearerKey, key=api_key)
    app.add_middleware(LastResort, hide=_hider(api_key))
    _error_handlers(app, api_key)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [_model_card(served)]}

    @app.get("/v1/models/{name}")
    async def model(name: str) -> dict:
        _check_model(served, name)
        return _model_card(served)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        _check_model(served, body.model)
        _check_generates(served, "/v1/completions")
        served.check_chars([body.prompt], "prompt")
        job = await run_in_threadpool(served.job, served.completion_prompt(body.prompt), body, False)
        rid = new_id("cmpl")
        if body.stream:
            return _sse(_completion_events(served, job, rid, body))
        answer = await _generate(served, job, request)
        counts = usage(answer.prompt_tokens, answer.completion_tokens)
        return completion_body(rid, served.name, answer.text, answer.finish_reason, counts)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        _check_model(served, body.model)
        _check_chat(served)
        roles = {"developer": "system"}  # OpenAI's newer name for the system role
        messages = [{"role": roles.get(m.role, m.role), "content": m.text()} for m in body.messages]
        served.check_chars(["".join(m["content"] for m in messages)], "messages")
        job = await run_in_threadpool(served.job, served.chat_prompt(messages), body, True)
        rid = new_id("chatcmpl")
        if body.stream:
            return _sse(_chat_events(served, job, rid, body))
        answer = await _generate(served, job, request)
        counts = usage(answer.prompt_tokens, answer.completion_tokens)
        return chat_body(rid, served.name, answer.text, answer.finish_reason, counts)

    @app.post("/v1/classify")
    async def classify(body: ClassifyRequest) -> dict:
        """{"model", "input": text | [texts]} -> {"object": "list", "model", "data": [{"index",
        "label", "probabilities": {label: p}}], "usage": {"prompt_tokens", "total_tokens"}}."""
        _check_model(served, body.model)
        if served.task != "classification":
            raise APIError(400, f"{served.name} generates text: use /v1/completions or /v1/chat/completions", "model")
        texts = [body.input] if isinstance(body.input, str) else body.input
        served.check_chars(texts, "input")
        encoded = served.check_inputs(texts)
        results = await run_in_threadpool(served.classify, encoded)
        tokens = sum(len(ids) for ids in encoded)
        counts = {"prompt_tokens": tokens, "total_tokens": tokens}
        return {"object": "list", "model": served.name, "data": results, "usage": counts}

    return app


def _model_card(served: ServedModel) -> dict:
    return {"id": served.name, "object": "model", "created": 0, "owned_by": "lmforge"}


def _check_model(served: ServedModel, name: str) -> None:
    if name != served.name:
        message = f"The model `{name}` does not exist: this server serves `{served.name}` (GET /v1/models)"
        raise APIError(404, message, "model", "model_not_found")


def _check_generates(served: ServedModel, endpoint: str) -> None:
    if served.task == "classification":
        message = (
            f"{served.name} is a classifier: it answers POST /v1/classify with "
            '{"model": ..., "input": "text" or ["texts"]}, not ' + endpoint
        )
        raise APIError(400, message, "model", "unsupported_endpoint")


def _check_chat(served: ServedModel) -> None:
    _check_generates(served, "/v1/chat/completions")
    if served.task == "seq2seq":
        message = f"{served.name} is a seq2seq model (input text to output text): use /v1/completions"
        raise APIError(400, message, "messages", "unsupported_endpoint")
    if not served.has_chat_template:
        message = f"{served.name} has no chat template (it was not trained on chat data): use /v1/completions"
        raise APIError(400, message, "messages", "unsupported_endpoint")


async def _generate(served: ServedModel, job: Job, request: Request) -> Answer:
    """`job`'s answer from a worker thread; a client that disconnects meanwhile cancels it."""
    watcher = asyncio.ensure_future(_cancel_on_disconnect(request, job))
    try:
        return await run_in_threadpool(served.run, job)
    finally:
        watcher.cancel()


async def _cancel_on_disconnect(request: Request, job: Job) -> None:
    while True:  # (the body was read: what comes next is the disconnect)
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancel.set()
            return


def _sse(events: AsyncIterator[dict | str]) -> StreamingResponse:
    async def lines() -> AsyncIterator[str]:
        async for event in events:
            yield f"data: {event if isinstance(event, str) else json.dumps(event, ensure_ascii=False)}\n\n"

    return StreamingResponse(lines(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _pieces(served: ServedModel, job: Job) -> AsyncIterator[str | Answer]:
    """The answer's pieces as the worker thread settles them, then the Answer. Closing this
    iterator early (the client left: the response task is cancelled) cancels the generation."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def on_text(piece: str) -> None:  # (in the worker thread)
        loop.call_soon_threadsafe(queue.put_nowait, piece)

    work = asyncio.ensure_future(run_in_threadpool(served.run, job, on_text))
    work.add_done_callback(lambda _: queue.put_nowait(None))  # after every piece: both go through the loop
    try:
        while (piece := await queue.get()) is not None:
            yield piece
        yield work.result()
    finally:
        job.cancel.set()  # (harmless once it has finished)


async def _completion_events(served: ServedModel, job: Job, rid: str, body: CompletionRequest) -> AsyncIterator:
    try:
        async for piece in _pieces(served, job):
            if isinstance(piece, str):
                yield completion_body(rid, served.name, piece, None, None)
            else:
                yield completion_body(rid, served.name, "", piece.finish_reason, None)
                if body.stream_options and body.stream_options.include_usage:
                    counts = usage(piece.prompt_tokens, piece.completion_tokens)
                    yield usage_chunk(rid, served.name, "text_completion", counts)
    except Exception:  # a bug: the status has gone out, so the stream says it
        logger.exception("generation failed")
        yield error_body("the generation failed; the server's log has the details", kind="server_error")
    yield "[DONE]"


async def _chat_events(served: ServedModel, job: Job, rid: str, body: ChatRequest) -> AsyncIterator:
    try:
        yield chat_chunk(rid, served.name, {"role": "assistant", "content": ""}, None)
        async for piece in _pieces(served, job):
            if isinstance(piece, str):
                yield chat_chunk(rid, served.name, {"content": piece}, None)
            else:
                yield chat_chunk(rid, served.name, {}, piece.finish_reason)
                if body.stream_options and body.stream_options.include_usage:
                    counts = usage(piece.prompt_tokens, piece.completion_tokens)
                    yield usage_chunk(rid, served.name, "chat.completion.chunk", counts)
    except Exception:
        logger.exception("generation failed")
        yield error_body("the generation failed; the server's log has the details", kind="server_error")
    yield "[DONE]"


class BearerKey:
    """ASGI middleware: a request to any path but /health needs `Authorization: Bearer <key>`,
    compared in constant time (`secrets.compare_digest`); else 401 with OpenAI's error body. It
    runs before the body is read, so a bad body from a client without the key is still a 401."""

    def __init__(self, app, key: str) -> None:
        self.app = app
        self._key = key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        scheme, _, given = Headers(scope=scope).get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and secrets.compare_digest(given.strip().encode(), self._key):
            await self.app(scope, receive, send)
            return
        if not given:
            message = "Missing API key: send the header Authorization: Bearer <key> (the server's --api-key-env value)"
        else:
            message = "Incorrect API key provided"  # (never echoed back)
        body = error_body(message, code="invalid_api_key")
        response = JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


class BodyLimit:
    """ASGI middleware: a request body over `max_mb` MiB is answered 413 (OpenAI's error body)
    before the app parses any of it. A declared Content-Length over the limit is refused at once;
    a body sent in chunks is read up to the limit, and past it read to its end and dropped (so
    that the client, still sending, gets the answer rather than a reset connection). A body within
    the limit is handed to the app as it came."""

    def __init__(self, app, max_mb: float) -> None:
        self.app = app
        self.max_mb = max_mb
        self.limit = int(max_mb * 2**20)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.limit:
            await self._refuse(scope, receive, send)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending its body
            size += len(message.get("body", b""))
            more = message.get("more_body", False)
            if size > self.limit:
                while more:  # drop the rest
                    message = await receive()
                    more = message["type"] == "http.request" and message.get("more_body", False)
                await self._refuse(scope, receive, send)
                return
            chunks.append(message.get("body", b""))
        await self.app(scope, _replay(b"".join(chunks), receive), send)

    async def _refuse(self, scope, receive, send) -> None:
        message = (
            f"The request body is larger than this server's limit of {self.max_mb:g} MiB: send a shorter "
            "prompt (the server's --max-request-mb option sets the limit)"
        )
        response = JSONResponse(error_body(message, code="request_too_large"), status_code=413)
        await response(scope, receive, send)


def _replay(body: bytes, receive):
    """An ASGI receive that gives `body` in one message, then what `receive` gives (the disconnect)."""
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


class LastResort:
    """ASGI middleware: an exception nothing else handled (a bug) is a 500 with OpenAI's error body
    and one line in the server's log: where it was raised and its message, with any credential
    blanked out (`hide`). The client learns nothing of it; a stream already under way just ends."""

    def __init__(self, app, hide: Callable[[str], str]) -> None:
        self.app = app
        self.hide = hide

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watched_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched_send)
        except Exception as exc:  # a bug: logged in one line, answered 500
            logger.error("%s %s failed: %s", scope.get("method"), scope.get("path"), self.hide(failure_line(exc)))
            if not started:
                body = error_body("internal error; the server's log has the details", kind="server_error")
                await JSONResponse(body, status_code=500)(scope, receive, send)


def failure_line(exc: BaseException) -> str:
    """`exc` in one line: its type, message and the file:line it was raised at."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" ({Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    message = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {message}{where}" if message else f"{type(exc).__name__}{where}"


def _hider(api_key: str | None) -> Callable[[str], str]:
    """What makes a text fit to send or log: credentials blanked out (`lmforge.secrets.redact_text`,
    and the API key), and what is not Unicode text (a lone surrogate a client sent) escaped."""

    def hide(text: str) -> str:
        text = redact_text(text.encode("utf-8", "backslashreplace").decode("utf-8"))
        return text.replace(api_key, REDACTED) if api_key else text

    return hide


def _error_handlers(app: FastAPI, api_key: str | None) -> None:
    """Every refusal in OpenAI's shape: 4xx (FastAPI's 422 becomes 400); bugs are `LastResort`'s 500.

    A message that repeats what the client sent (a model name, a bad value) has any credential in
    it replaced (`lmforge.secrets.redact_text`: the API key, secret-named environment variables'
    values, token shapes), so that no response carries one, whatever a client sends.
    """

    hide = _hider(api_key)

    def hidden(text: str | None) -> str | None:
        return None if text is None else hide(text)

    def refusal(status: int, message: str, param=None, code=None, kind="invalid_request_error", headers=None):
        body = error_body(hidden(message), hidden(param), code, kind)
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return refusal(exc.status, exc.message, exc.param, exc.code, exc.kind)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(exc.errors())
        return refusal(400, message, param)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {exc.detail}"
        code = "not_found" if exc.status_code == 404 else None
        return refusal(exc.status_code, message, code=code, headers=exc.headers)


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """(message, param) of the first problem FastAPI found in a request body: the first a validator
    raised, if any (a value that fails one member of a union, such as `str | list[str]`, also fails
    the others by type, and the validator's reason is the one that says what to fix)."""
    error = next((e for e in errors if e.get("type") == "value_error"), errors[0])
    loc = [str(part) for part in error.get("loc", ()) if part != "body" and not _type_tag(str(part))]
    param = loc[0] if loc else None
    where = ".".join(loc[:3]) if loc else "the body"
    kind = error.get("type", "")
    if kind == "json_invalid":
        detail = (error.get("ctx") or {}).get("error", "")
        return f"We could not parse the JSON body of your request ({detail}): send a JSON object.", None
    if kind == "missing":
        if param is None:
            return "Missing request body: send a JSON object.", None
        return f"Missing required parameter: '{param}'.", param
    if kind == "extra_forbidden":
        return f"Unrecognized request argument supplied: {param}", param
    if kind == "string_unicode":  # (pydantic's own check, on a key)
        shown = ascii(error.get("input"))[:80]
        return f"The request body holds {shown}, which is not Unicode text: send valid UTF-8.", param
    if not loc:
        return "The request body must be a JSON object.", None
    shown = repr(error.get("input"))
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
    return f"Invalid value for '{where}': {message} (got {shown}).", param


def _type_tag(part: str) -> bool:
    """Whether a part of an error's location names a member of a union (str, list[str]), not a field."""
    return part in {"str", "int", "float", "bool", "list", "dict", "none"} or "[" in part


DEFAULT_KEY_ENV = "LMFORGE_API_KEY"
"""The variable whose key `lmforge serve` requires when no --api-key-env is given (if it is set)."""


def api_key_from(variable: str | None) -> str | None:
    """The API key the environment variable `variable` holds. With no variable named, the key is
    LMFORGE_API_KEY's when that is set and not empty, else there is none (None).

    Raises:
        UserError: the named variable is unset or empty (a server meant to need a key would be open).
    """
    if variable is None:
        return os.environ.get(DEFAULT_KEY_ENV, "").strip() or None
    key = os.environ.get(variable, "")
    if not key.strip():
        state = "empty" if variable in os.environ else "not set"
        raise UserError(
            f"--api-key-env {variable}: that environment variable is {state}; export {variable}=<a long random "
            "key> first (clients send it as their API key), or leave out --api-key-env to serve without a key"
        )
    return key.strip()


def serve(
    target: Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key_env: str | None = None,
    model_name: str | None = None,
    raw: bool = False,
    log: Callable[[str], None] = print,
    max_request_mb: float = DEFAULT_MAX_REQUEST_MB,
) -> None:
    """Load `target` and serve it on http://host:port until Ctrl-C (or SIGTERM), which stops it cleanly.

    Args:
        api_key_env: the environment variable holding the API key clients must send; None: no key.
        model_name: what clients call the model; default: `model.default_name(target)`.
        raw: completions continue prompts as given, not through the run's template.
        max_request_mb: the largest request body read, in MiB (larger: 413).

    Raises:
        UserError: an API key variable that is unset or empty, a port in use, or a target that is no model.
    """
    import uvicorn

    key = api_key_from(api_key_env)
    _check_port(host, port)
    served = ServedModel.load(target, model_name, raw)
    app = create_app(served, key, max_request_mb)
    config = uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
    shown = f"[{host}]" if ":" in host else host
    log(f"serving {served.name} ({served.task}) at http://{shown}:{port}/v1 (Ctrl-C stops)")
    if key is None and host not in ("127.0.0.1", "localhost", "::1"):
        log(f"warning: no API key: anyone who reaches {host}:{port} can use the model (see --api-key-env)")
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn shuts down, then passes Ctrl-C on
        uvicorn.Server(config).run()
    log("stopped")


def _check_port(host: str, port: int) -> None:
    """Raises UserError when `host:port` cannot be listened on (in use, or not this machine's address)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            probe.bind((host, port))
        except OSError as exc:
            message = f"--host {host} --port {port}: cannot listen there ({exc.strerror}); choose another --port"
            raise UserError(message) from None
