"""Reading OpenAI requests: every field checked, every mistake a 400 with OpenAI's error body.

Fields nnxlm does not know are accepted and ignored, as OpenAI's clients expect. Fields it knows
but does not implement (penalties, logit_bias, echo, legacy functions, JSON response formats,
best_of) are refused when set to anything but their neutral value, rather than silently ignored.
"""

from __future__ import annotations

import json
import math

from fastapi.responses import JSONResponse

from nnxlm.data.chat import text_of_parts
from nnxlm.serving.engine import Settings
from nnxlm.serving.steps import TOP_LOGPROBS
from nnxlm.serving.tools import message_tool_calls

MAX_STOP = 16  # stop strings a request may give
MAX_N = 16  # choices a request may ask for (each takes a slot)
NEUTRAL = {  # known fields nnxlm does not implement, and the values that ask for nothing
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "repetition_penalty": (None, 1, 1.0),
    "logit_bias": (None, {}),
    "echo": (None, False),
    "suffix": (None, ""),
    "functions": (None, []),
    "response_format": (None, {"type": "text"}),
    "best_of": (None, 1),
    "parallel_tool_calls": (None, True),  # false: one call at most, which the server cannot promise
}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


class APIError(Exception):
    """An error answered with `status` and OpenAI's body {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, *, param=None, code=None, type="invalid_request_error", headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type, self.headers = type, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param=param)


async def json_body(http) -> dict:
    raw = await http.body()
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e})") from None
    except RecursionError:
        raise APIError(400, "the request body is not valid JSON: nested too deeply") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, not {type(body).__name__}")
    for field, neutral in NEUTRAL.items():
        if field in body and body[field] not in neutral:
            raise bad(field, "is not supported by this server; leave it out")
    return body


def check_model(body: dict, model_name: str) -> None:
    model = body.get("model")
    if model is not None and model != model_name:
        raise APIError(  # 404, as OpenAI answers: its client raises NotFoundError
            404,
            f"model {model!r} does not exist: this server serves {model_name!r}",
            param="model",
            code="model_not_found",
        )


def _number(body, name, default, low, high, integer=False, low_open=False):
    value = body.get(name)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or (not integer and not math.isfinite(value)):
        raise bad(name, f"must be {'an integer' if integer else 'a number'}, got {json.dumps(value)}")
    if value < low or value > high or (low_open and value == low):
        raise bad(name, f"must be {'>' if low_open else '>='} {low} and <= {high}, got {value}")
    return value


def max_tokens_field(body: dict, chat: bool) -> str:
    """The request's field that caps the completion: chat's max_completion_tokens when given (it
    wins over the older max_tokens), else max_tokens."""
    return "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"


def settings(body: dict, prompt_length: int, engine, chat: bool) -> Settings:
    room = engine.max_length - prompt_length
    if room < 1:
        raise APIError(
            400,
            f"this model's context is {engine.max_length} tokens and the prompt has {prompt_length}: shorten it "
            "(the server's --max_length sets the context)",
            param="messages" if chat else "prompt",
            code="context_length_exceeded",
        )
    name = max_tokens_field(body, chat)
    max_tokens = _number(body, name, room if chat else min(16, room), 1, 2**31 - 1, integer=True)
    top_logprobs = 0
    if chat:
        if body.get("logprobs") is not None and not isinstance(body.get("logprobs"), bool):
            raise bad("logprobs", "must be true or false")
        top_logprobs = _number(body, "top_logprobs", 0, 0, TOP_LOGPROBS, integer=True)
        if top_logprobs and not body.get("logprobs"):
            raise bad("top_logprobs", "needs logprobs: true")
    else:
        top_logprobs = _number(body, "logprobs", 0, 0, 5, integer=True)
    top_k = _number(body, "top_k", 0, -1, 2**31 - 1, integer=True)
    return Settings(
        max_tokens=max_tokens,
        temperature=float(_number(body, "temperature", 1.0, 0.0, 2.0)),
        top_p=float(_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True)),
        top_k=max(top_k, 0),
        seed=None if body.get("seed") is None else seed32(_number(body, "seed", 0, -(2**63), 2**64 - 1, integer=True)),
        n=_number(body, "n", 1, 1, min(MAX_N, engine.num_slots), integer=True),
        stop=_stops(body.get("stop")),
        stop_token_ids=_token_ids(body.get("stop_token_ids") or [], "stop_token_ids", engine.tokenizer),
        top_logprobs=top_logprobs,
    )


def seed32(seed: int) -> int:
    """The engine's 32-bit seed of a request's seed: itself from 0 to 2^32 - 1; any other 64-bit
    value (a negative one, or 2^32 and above) hashed (splitmix64's finalizer), so that seeds
    differing only in their upper bits do not give the same tokens."""
    z = seed % 2**64
    if z < 2**32:
        return z
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 % 2**64
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB % 2**64
    return (z ^ (z >> 31)) >> 32


def wants_logprobs(body: dict, chat: bool) -> bool:
    return bool(body.get("logprobs")) if chat else body.get("logprobs") is not None


def stream_options(body: dict) -> tuple[bool, bool]:
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise bad("stream", "must be true or false")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad("stream_options", "must be an object")
    include = options.get("include_usage", False)
    if include is not None and not isinstance(include, bool):
        raise bad("stream_options.include_usage", "must be true or false")
    return bool(stream), bool(include)


def _stops(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad("stop", "must be a string or a list of strings")
    if len(stops) > MAX_STOP:
        raise bad("stop", f"at most {MAX_STOP} stop strings, got {len(stops)}")
    return tuple(s for s in stops if s)


def _token_ids(ids, param: str, tokenizer) -> list[int]:
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise bad(param, "must be a list of token ids (integers)")
    vocab = tokenizer.vocab_size
    outside = [i for i in ids if not 0 <= i < vocab]
    if outside:
        raise bad(param, f"token id {outside[0]} is outside the vocabulary [0, {vocab})")
    return ids


def completion_prompts(body: dict, tokenizer) -> list[list[int]]:
    """The token ids of each prompt: a string, a list of strings, a list of ids or of id lists.
    A text prompt is preceded by bos, as in `nnxlm decode`."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
        return [_nonempty(_token_ids(prompt, "prompt", tokenizer))]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):
        return [_nonempty(_token_ids(p, "prompt", tokenizer)) for p in prompt]
    else:
        raise bad("prompt", "must be a string, a list of strings, a list of token ids or a list of such lists")
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    return [_nonempty(bos + tokenizer.encode(_text(p, "prompt"))) for p in prompts]


def _text(text: str, param: str) -> str:
    """text, when it is text: JSON's "\\ud800" escapes decode to lone surrogates, which no tokenizer
    (and no UTF-8) can take."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise bad(param, "holds a lone surrogate (an unpaired \\ud800-\\udfff escape): send valid text") from None
    return text


def _nonempty(ids):
    if not ids:
        raise bad("prompt", "is empty: give at least one token")
    return ids


def chat_prompt(body: dict, tokenizer, template, tools: list[dict] | None = None) -> list[int]:
    """The conversation rendered by the model's chat template, with the assistant's header; an
    assistant's tool calls and a tool's answer keep the fields templates read."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "must be a non-empty list of {role, content} objects")
    turns = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or message["role"] not in ROLES:
            raise bad(where, f"needs a role, one of {sorted(ROLES)}")
        content = message.get("content")
        if isinstance(content, list):  # content parts: only text ones
            content = text_of_parts(content)
            if content is None:
                raise bad(f"{where}.content", "only text parts ({type: text, text}) are supported")
        turn = {"role": ROLES[message["role"]], "content": content}
        if message["role"] == "assistant" and message.get("tool_calls"):
            turn["tool_calls"] = message_tool_calls(message["tool_calls"], where, bad)
            if content is None:
                del turn["content"]  # as transformers passes a tool-call turn whose content is null
        elif content is None and message["role"] == "assistant":
            turn["content"] = ""
        if not isinstance(turn.get("content", ""), str):
            raise bad(f"{where}.content", "must be a string or a list of text parts")
        if message["role"] == "tool":
            turn.update({k: message[k] for k in ("tool_call_id", "name") if isinstance(message.get(k), str)})
        turns.append(turn)
    try:
        text = template.render(turns, add_generation_prompt=True, tools=tools)
    except Exception as e:  # noqa: BLE001 - the template's own complaint (raise_exception) about the turns
        raise bad("messages", f"the model's chat template refuses them: {e}") from None
    return tokenizer.encode_with_offsets(_text(text, "messages"))[0]
