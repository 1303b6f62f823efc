"""The OpenAI-compatible HTTP API over an Engine (FastAPI; `nnxlm serve` runs it under uvicorn).

FastAPI and uvicorn are what the OpenAI-compatible servers people already run are built on, both
well kept; the JAX work never runs on the event loop (the engine has its own thread). Requests are
read as plain JSON and checked here rather than by pydantic models, so that every mistake is a 400
with OpenAI's error body naming the field (pydantic's would be 422s) and unknown fields pass.

POST /v1/completions, POST /v1/chat/completions (streaming as server-sent events), GET /v1/models,
GET /health, GET /metrics (Prometheus).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from nnxlm.serving import requests as parse
from nnxlm.serving import tools
from nnxlm.serving.engine import Engine, QueueFull, ShuttingDown, TooManyChoices, Update
from nnxlm.serving.metrics import CONTENT_TYPE
from nnxlm.serving.requests import APIError

DISCONNECT_CHECK_S = 0.5  # how often a request's client is checked for having gone away


def create_app(engine: Engine, model_name: str, template=None, tool_parser: str | None = None) -> FastAPI:
    """The app serving `engine` as model `model_name`; template: the ChatTemplate of chat requests;
    tool_parser: the format of the model's tool calls (nnxlm.serving.tools.FORMATS; default: the
    one its template shows)."""
    tool_format = tool_parser or tools.template_format(template)
    app = FastAPI(title="nnxlm", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())
    tokenizer = engine.tokenizer

    @app.exception_handler(APIError)
    async def api_error(_, error: APIError):
        return error.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, error: StarletteHTTPException):  # no such route or method: OpenAI's body too
        message = f"{error.detail}: see GET /v1/models, POST /v1/completions and POST /v1/chat/completions"
        code = "not_found" if error.status_code == 404 else None
        return APIError(error.status_code, message, code=code, headers=error.headers).response()

    @app.exception_handler(Exception)
    async def internal_error(_, error: Exception):  # one request's failure; the server goes on
        return APIError(500, f"{type(error).__name__}: {error}", type="internal_error").response()

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        card = {"id": model_name, "object": "model", "created": created, "owned_by": "nnxlm"}
        return {"object": "list", "data": [{**card, "max_model_len": engine.max_length}]}

    @app.get("/metrics")
    async def metrics():
        return Response(engine.metrics.text(), media_type=CONTENT_TYPE)

    @app.post("/v1/completions")
    async def completions(http: Request):
        body = await parse.json_body(http)
        parse.check_model(body, model_name)
        prompts = parse.completion_prompts(body, tokenizer)
        return await _serve(http, engine, body, prompts, chat=False, model_name=model_name)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: Request):
        body = await parse.json_body(http)
        parse.check_model(body, model_name)
        functions, calls_format = tools.request_tools(body, tool_format, parse.bad)
        prompts = [parse.chat_prompt(body, tokenizer, template, functions)]
        return await _serve(http, engine, body, prompts, chat=True, model_name=model_name, tool_format=calls_format)

    return app


async def _serve(
    http: Request, engine: Engine, body: dict, prompts: list[list[int]], chat: bool, model_name: str, tool_format=None
):
    settings = [parse.settings(body, len(p), engine, chat) for p in prompts]
    stream, include_usage = parse.stream_options(body)
    loop = asyncio.get_running_loop()
    wake = asyncio.Event()
    notify = lambda: loop.call_soon_threadsafe(wake.set)  # noqa: E731
    try:
        submitted = engine.submit_all(prompts, settings, notify)
    except QueueFull as e:
        raise APIError(
            429, f"the server is busy: {e}; retry later", type="rate_limit_error", headers={"Retry-After": "1"}
        ) from None
    except ShuttingDown as e:
        raise APIError(503, str(e), type="unavailable") from None
    except TooManyChoices as e:  # a 400: a 429 would have the client retry what can never start
        raise parse.bad("n" if len(prompts) == 1 else "prompt", str(e)) from None
    except ValueError as e:  # the engine's words for the cap, in the field the request used
        name = parse.max_tokens_field(body, chat)
        raise APIError(400, str(e).replace("max_tokens", name), param=name, code="context_length_exceeded") from None
    n = settings[0].n
    response_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    render = _Render(
        engine.tokenizer,
        chat,
        response_id,
        model_name,
        settings[0].top_logprobs,
        parse.wants_logprobs(body, chat),
        tool_format,
    )
    updates = _updates(submitted, n, wake, http)
    if stream:
        return StreamingResponse(
            _events(render, updates, submitted, n, include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )
    choices: dict[int, list[Update]] = {}
    try:
        async for index, update in updates:
            choices.setdefault(index, []).append(update)
    finally:
        for request in submitted:
            request.cancel()  # (a no-op for finished requests) the client left, or a request failed
    return JSONResponse(render.response(choices, _usage(submitted)))


async def _updates(requests, n: int, wake: asyncio.Event, http: Request):
    """(choice index across prompts, update) as they arrive, until every choice has finished;
    an APIError if one failed. Watches for a client that went away while waiting."""
    open_choices, checked = len(requests) * n, time.monotonic()
    while open_choices:
        wake.clear()
        if time.monotonic() - checked > DISCONNECT_CHECK_S:  # also while tokens flow
            if await http.is_disconnected():
                return
            checked = time.monotonic()
        arrived = [(i * n + u.choice, u, r) for i, r in enumerate(requests) for u in r.poll()]
        if not arrived:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), timeout=DISCONNECT_CHECK_S)
            continue
        for index, update, request in arrived:
            if update.finish_reason == "error":
                raise APIError(500, f"generation failed: {request.error}", type="internal_error")
            if update.finish_reason == "cancelled":
                return
            open_choices -= update.finish_reason is not None
            yield index, update


async def _events(render, updates, requests, n: int, include_usage: bool):
    """Server-sent events: a chunk per update, the usage chunk when asked, then [DONE]."""
    try:
        if render.chat:
            for index in range(len(requests) * n):
                yield _sse(render.chunk(index, None, first=True, usage_field=include_usage))
        try:
            async for index, update in updates:
                yield _sse(render.chunk(index, update, usage_field=include_usage))
        except APIError as e:  # the stream has started: the error is its last event
            yield _sse(e.body())
            return
        if include_usage:
            yield _sse({**render.chunk(0, None, usage_field=True), "choices": [], "usage": _usage(requests)})
        yield "data: [DONE]\n\n"
    finally:
        for request in requests:
            request.cancel()  # a client that disconnected mid-stream frees its slots


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _usage(requests) -> dict:
    prompt = sum(len(r.prompt_ids) for r in requests)
    completion = sum(c.generated for r in requests for c in r.choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class _Render:
    """Response bodies and stream chunks in OpenAI's schema."""

    def __init__(self, tokenizer, chat: bool, response_id: str, model: str, top: int, logprobs: bool, tool_format=None):
        self.tokenizer, self.chat, self.id, self.model = tokenizer, chat, response_id, model
        self.top, self.logprobs, self.created = top, logprobs, int(time.time())
        self.tool_format = tool_format  # the format of tool calls to parse out of chat answers, if any
        self._calls: dict[int, tools.Calls] = {}  # each streamed choice's text, while tool calls may come

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def _token(self, token_id: int) -> tuple[str, list[int]]:
        raw = self.tokenizer.token_bytes(token_id) if hasattr(self.tokenizer, "token_bytes") else b""
        return raw.decode("utf-8", errors="backslashreplace"), list(raw)

    def _logprobs(self, tokens, offset: int = 0):
        if not self.logprobs:
            return None
        if self.chat:
            content = []
            for t in tokens:
                text, raw = self._token(t.id)
                top = [dict(zip(("token", "bytes"), self._token(i), strict=True), logprob=lp) for i, lp in t.top]
                content.append({"token": text, "logprob": t.logprob, "bytes": raw, "top_logprobs": top})
            return {"content": content, "refusal": None}
        strings = [self._token(t.id)[0] for t in tokens]
        return {
            "tokens": strings,
            "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [{self._token(i)[0]: lp for i, lp in t.top} for t in tokens] if self.top else None,
            "text_offset": [offset + t.start for t in tokens],
        }

    def response(self, choices: dict[int, list[Update]], usage: dict) -> dict:
        out = []
        for index in sorted(choices):
            updates = choices[index]
            text = "".join(u.text for u in updates)
            tokens = [t for u in updates for t in u.tokens]
            finish = updates[-1].finish_reason
            if self.chat:
                message = {"role": "assistant", "content": text, "refusal": None}
                if self.tool_format and (calls := tools.parse(text, self.tool_format))[1]:
                    message["content"], message["tool_calls"], finish = *calls, "tool_calls"
                out.append(
                    {"index": index, "message": message, "logprobs": self._logprobs(tokens), "finish_reason": finish}
                )
            else:
                out.append({"index": index, "text": text, "logprobs": self._logprobs(tokens), "finish_reason": finish})
        kind = "chat.completion" if self.chat else "text_completion"
        return {**self._head(kind), "choices": out, "usage": usage}

    def chunk(self, index: int, update: Update | None, first: bool = False, usage_field: bool = False) -> dict:
        finish = None if update is None else update.finish_reason
        tokens = [] if update is None else update.tokens
        text = "" if update is None else update.text
        if self.chat:
            calls = []
            if self.tool_format and update is not None:
                stream = self._calls.setdefault(index, tools.Calls(self.tool_format))
                text = stream.add(text)
                if finish is not None:
                    rest, calls = stream.finish()
                    text, finish = text + rest, "tool_calls" if calls else finish
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            if calls:
                delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(calls)]
            choice = {"index": index, "delta": delta, "logprobs": self._logprobs(tokens) if tokens else None}
            body = {**self._head("chat.completion.chunk"), "choices": [{**choice, "finish_reason": finish}]}
        else:
            logprobs = self._logprobs(tokens) if tokens else None
            choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
            body = {**self._head("text_completion"), "choices": [choice]}
        if usage_field:
            body["usage"] = None
        return body


@contextlib.contextmanager
def serve_in_thread(app, host: str = "127.0.0.1", port: int = 0, timeout: float = 60.0):
    """Runs uvicorn with `app` in a thread (a notebook, a test, a benchmark): yields the base URL,
    e.g. http://127.0.0.1:PORT (port 0: a free one), and stops the server on exit."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, name="nnxlm-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout)
