"""Tool calling in the chat API, as OpenAI's clients use it: a request's `tools` reach the model's
chat template, and the calls the model writes come back as `message.tool_calls`.

A model writes its calls as text in the format its chat template taught it; two formats cover the
converted families that call tools:
- "hermes" (Qwen 2.5 / 3, Hermes, SmolLM3): `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`,
  one block per call, after any text;
- "llama3_json" (Llama 3.1 / 3.2): the whole answer is `{"name": ..., "parameters": {...}}`
  (several separated by ";"), after a `<|python_tag|>` where the model writes one.
The format is read from the template (`detect`) or named with `nnxlm serve --tool_parser`. Text
that does not parse as calls is the answer's content, as it was written.

Streaming sends the content as it comes and holds back what may be a call (from `<tool_call>` on,
or an answer that opens with `{`), then sends the calls whole in the last chunk.
"""

from __future__ import annotations

import json
import uuid

FORMATS = ("hermes", "llama3_json")
HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"  # Llama 3.1's opening of a call; a special token, kept in the served text


def detect(template_source: str | None) -> str | None:
    """The call format a chat template teaches, or None when it shows none."""
    source = template_source or ""
    if HERMES_OPEN in source:
        return "hermes"
    if '"parameters"' in source or "<|python_tag|>" in source:
        return "llama3_json"
    return None


def template_format(template) -> str | None:
    """The call format of a ChatTemplate: the one its conversations with tools are rendered in."""
    return detect(getattr(template, "tool_template", None) or getattr(template, "template", None))


def _call(obj, arguments_key: str, required: bool = False) -> dict | None:
    """OpenAI's tool call of a parsed {"name", arguments_key} object, or None; required: the
    arguments must be there (a JSON answer that only has a "name" is an answer, not a call)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    if required and arguments_key not in obj and "arguments" not in obj:
        return None
    arguments = obj.get(arguments_key, obj.get("arguments", {}))
    if not isinstance(arguments, dict | str):
        return None
    if isinstance(arguments, str):  # JSON text is passed on; other text is made a JSON string
        try:
            json.loads(arguments)
            text = arguments
        except (ValueError, RecursionError):
            text = json.dumps(arguments, ensure_ascii=False)
    else:
        text = json.dumps(arguments, ensure_ascii=False)
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": obj["name"], "arguments": text},
    }


def parse(text: str, fmt: str) -> tuple[str | None, list[dict]]:
    """(content, tool calls) of a generated answer; no calls and the text as it is when it holds
    none or they do not parse."""
    if fmt == "hermes":
        before, calls, rest = text.split(HERMES_OPEN, 1)[0], [], text
        while HERMES_OPEN in rest:
            body, _, rest = rest.split(HERMES_OPEN, 1)[1].partition(HERMES_CLOSE)
            try:
                call = _call(json.loads(body), "arguments")
            except (ValueError, RecursionError):
                call = None
            if call is None:  # an unclosed last block is a call if it parses (the model ended there)
                return text, []
            calls.append(call)
        return (before or None) if calls else text, calls
    rest = text.strip().removeprefix(PYTHON_TAG).lstrip()
    if not rest.startswith("{"):
        return text, []
    calls, decoder = [], json.JSONDecoder()
    while rest:  # objects one after another, separated by ';' (which may also be inside their strings)
        try:
            obj, end = decoder.raw_decode(rest)
        except (ValueError, RecursionError):
            return text, []
        if (call := _call(obj, "parameters", required=True)) is None:
            return text, []
        calls.append(call)
        rest = rest[end:].lstrip().removeprefix(";").lstrip()
    return None, calls


class Calls:
    """One choice's text while it streams: `add` gives the content that may be sent now, `finish`
    what is left of it and the calls."""

    def __init__(self, fmt: str):
        self.fmt, self.text, self.sent = fmt, "", 0

    def add(self, piece: str) -> str:
        self.text += piece
        end = self._sendable()
        new, self.sent = self.text[self.sent : end], max(self.sent, end)
        return new

    def _sendable(self) -> int:
        if self.fmt == "hermes":
            at = self.text.find(HERMES_OPEN)
            if at >= 0:
                return at
            for n in range(min(len(self.text), len(HERMES_OPEN) - 1), 0, -1):  # the start of a tag
                if HERMES_OPEN.startswith(self.text[-n:]):
                    return len(self.text) - n
            return len(self.text)
        start = self.text.lstrip()
        could_be_call = not start or start.startswith(("{", PYTHON_TAG)) or PYTHON_TAG.startswith(start)
        return self.sent if could_be_call and self.sent == 0 else len(self.text)

    def finish(self) -> tuple[str, list[dict]]:
        """(content not sent yet, calls)."""
        content, calls = parse(self.text, self.fmt)
        if not calls:
            return self.text[self.sent :], []
        rest = (content or "")[self.sent :]
        return rest, calls


def request_tools(body: dict, fmt: str | None, bad) -> tuple[list[dict] | None, str | None]:
    """(tools for the chat template, the format to parse calls in, or None) of a request; `bad`
    makes the 400 of a field."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    forced = choice == "required" or (isinstance(choice, dict) and choice.get("type") == "function")
    if choice not in (None, "auto", "none") and not forced:
        raise bad("tool_choice", "must be 'auto', 'none', 'required' or {type: function, function: {name}}")
    if tools is None or tools == []:
        if forced:
            raise bad("tool_choice", "names tools but the request has no tools")
        return None, None
    if not isinstance(tools, list):
        raise bad("tools", "must be a list of {type: function, function: {name, description, parameters}}")
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
            raise bad(f"tools[{i}]", "must be {type: function, function: {name, description, parameters}}")
        if not isinstance(function.get("name"), str) or not function["name"]:
            raise bad(f"tools[{i}].function.name", "must be a non-empty string")
        if not isinstance(function.get("parameters", {}), dict):
            raise bad(f"tools[{i}].function.parameters", "must be a JSON schema object")
    if forced:
        raise bad("tool_choice", "only 'auto' and 'none' are supported: forcing a call needs constrained decoding")
    if fmt is None and choice != "none":  # with none the calls stay text: no format needed
        raise bad(
            "tools",
            "this model's chat template shows no tool-call format: serve it with --tool_parser "
            f"({' or '.join(FORMATS)}) or a --chat_template that renders tools",
        )
    return tools, (None if choice == "none" else fmt)


def message_tool_calls(calls, where: str, bad) -> list[dict]:
    """An assistant message's tool_calls for the chat template: OpenAI's arguments are a JSON
    string, which templates print with `tojson`, so they are passed as the object they encode."""
    if not isinstance(calls, list):
        raise bad(f"{where}.tool_calls", "must be a list of {id, type: function, function: {name, arguments}}")
    out = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise bad(f"{where}.tool_calls[{j}]", "must be {id, type: function, function: {name, arguments}}")
        arguments = function.get("arguments", "{}")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments or "{}")
            except (ValueError, RecursionError):
                raise bad(f"{where}.tool_calls[{j}].function.arguments", "is not valid JSON") from None
        elif not isinstance(arguments, dict):
            raise bad(f"{where}.tool_calls[{j}].function.arguments", "must be JSON text (a string)")
        out.append({**call, "function": {**function, "arguments": arguments}})
    return out
