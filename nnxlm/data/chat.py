"""Chat templates: conversations -> the text a model was trained on, rendered as transformers does.

A chat template is a Jinja template (Hugging Face's convention): `chat_template.jinja` beside the
tokenizer, or the `chat_template` field of `tokenizer_config.json`. It is rendered with the
conversation as `messages`, `add_generation_prompt`, and the tokenizer's special tokens as strings
(`bos_token`, `eos_token`, ...), in a sandboxed environment with the settings of transformers'
`apply_chat_template` (trim_blocks, lstrip_blocks, loop controls, `raise_exception`,
`strftime_now`, a `tojson` that keeps non-ASCII text), so the text is byte for byte the same.
Templates are data: the sandbox gives them no access to Python objects beyond plain values.

Tokenizers trained by nnxlm have no template; BUILTIN_TEMPLATE is theirs:

    <|system|>\\n{content}\\n<|user|>\\n{content}\\n<|assistant|>\\n{content}</s>\\n...

and the generation prompt is `<|assistant|>\\n`. The eos token ends every assistant turn.

Which tokens an assistant turn covers (`assistant_spans`): where the template marks them with
`{% generation %}` ... `{% endgeneration %}`, those characters; otherwise the characters that
rendering the conversation up to turn k adds to the rendering of the turns before it with a
generation prompt (the turn's content and its end-of-turn token, not its role header). Trailing
whitespace after the end-of-turn token is left out (generation stops at that token).
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import functools
import json

from etils import epath

from nnxlm.errors import UserError

ROLES = ("system", "user", "assistant", "tool")
TEMPLATE_FILE = "chat_template.jinja"
BUILTIN_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def find_template(directory: str, name: str = "default") -> str | None:
    """The chat template kept beside a tokenizer: chat_template.jinja, else tokenizer_config.json's
    chat_template; None when there is neither. When there are several named ones (a list in the
    config, or additional_chat_templates/<name>.jinja beside chat_template.jinja), the one called
    `name`: "default", or "tool_use" (None when there is none), which transformers renders for a
    conversation with tools."""
    path = epath.Path(directory) / TEMPLATE_FILE
    named_file = epath.Path(directory) / "additional_chat_templates" / f"{name}.jinja"  # as transformers saves
    if name != "default" and named_file.exists():
        return named_file.read_text()
    if path.exists():
        return path.read_text() if name == "default" else None
    config_path = epath.Path(directory) / "tokenizer_config.json"
    if not config_path.exists():
        return None
    try:
        template = json.loads(config_path.read_text()).get("chat_template")
    except (OSError, ValueError) as e:
        raise UserError(f"{config_path} is not readable JSON ({e}): fix or remove it") from None
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
        if "default" not in named:
            raise UserError(f"{config_path} holds chat templates {sorted(named)} but no 'default' one: name one")
        template = named.get(name)
    elif name != "default":
        return None
    if template is not None and not isinstance(template, str):
        raise UserError(f"{config_path}: chat_template is {type(template).__name__}, not a template string")
    return template


class TemplateFailure(UserError):
    """A chat template that cannot render a conversation; `located` names the example."""


@contextlib.contextmanager
def located(where: str):
    """Template failures inside name `where` (the example's file:line), as data errors do."""
    try:
        yield
    except TemplateFailure as e:
        raise UserError(f"{where}: {e}") from None


_GENERATION_SPANS: contextvars.ContextVar = contextvars.ContextVar("nnxlm_generation_spans", default=None)


@functools.lru_cache(maxsize=16)
def _compile(template: str):
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationSpans(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` renders its body and, while recording, notes
        where the body starts and ends in the output (transformers' assistant mask markers)."""

        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)  # the tag's name
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_mark", [jinja2.nodes.ContextReference()]), [], [], body)

        def _mark(self, context, caller):
            text = caller()
            recording = _GENERATION_SPANS.get()
            if recording is not None:  # (output chunks so far, spans): the body starts where they end
                chunks, spans = recording
                start = sum(len(chunk) for chunk in chunks)
                spans.append((start, start + len(text)))
            return text

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationSpans, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise UserError(f"the chat template does not parse (line {e.lineno}: {e.message}): fix the template") from None


class ChatTemplate:
    """A chat template with the special tokens it is rendered with.

    special_tokens: {"bos_token": "<s>", "eos_token": "</s>", ...} as the tokenizer names them.
    tool_template: the template for conversations with tools, where the tokenizer names one
      ("tool_use"); None: `template` renders them too.
    """

    def __init__(self, template: str, special_tokens: dict[str, str], tool_template: str | None = None):
        self.template, self.tool_template = template, tool_template
        self.special_tokens = dict(special_tokens)
        for source in (template, tool_template or template):  # a template that does not parse fails here
            _compile(source)

    def _source(self, tools) -> str:
        """The template a conversation is rendered with: as transformers picks it, the tool_use one
        whenever tools are passed."""
        return self.tool_template if tools is not None and self.tool_template else self.template

    def render(self, messages: list[dict], add_generation_prompt: bool = False, tools: list | None = None) -> str:
        """The conversation as text; `tools` (JSON schemas of functions the model may call) reach the
        template as transformers' apply_chat_template passes them."""
        return "".join(self._chunks(messages, add_generation_prompt, tools, []))

    def _chunks(self, messages, add_generation_prompt: bool, tools, chunks: list[str]) -> list[str]:
        import jinja2

        source = self._source(tools)
        if source == BUILTIN_TEMPLATE and (tools or any("tool_calls" in m for m in messages)):
            raise TemplateFailure(
                "nnxlm's built-in chat template has no tool calls: train with a tokenizer whose chat template "
                "renders tools (one converted from a model that calls tools), or leave tools out of the data"
            )
        variables = dict(messages=messages, tools=tools, documents=None, add_generation_prompt=add_generation_prompt)
        try:
            for chunk in _compile(source).generate(**variables, **self.special_tokens):
                chunks.append(chunk)
        except (jinja2.exceptions.TemplateError, TypeError, ValueError, LookupError, AttributeError) as e:
            raise TemplateFailure(
                f"the chat template does not render this conversation ({type(e).__name__}: {e}): fix the template "
                "or the data"
            ) from None
        return chunks

    def assistant_spans(self, messages: list[dict], tools: list | None = None) -> tuple[str, list[tuple[int, int]]]:
        """(the rendered conversation, [(start, end) character range of each assistant turn])."""
        if "generation" in self._source(tools) and "endgeneration" in self._source(tools):
            return self._marked_spans(messages, tools)
        text = self.render(messages, tools=tools)
        spans = []
        for k, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self.render(messages[:k], add_generation_prompt=True, tools=tools)
            upto = self.render(messages[: k + 1], tools=tools)
            if not (upto.startswith(prompt) and text.startswith(upto)):
                raise TemplateFailure(
                    "the chat template does not render a conversation turn by turn (the text up to an assistant "
                    "turn is not a prefix of the whole), so its assistant tokens cannot be found: add "
                    "{% generation %} markers to the template or train on every token (loss_on='all')"
                )
            end = len(prompt) + len(upto[len(prompt) :].rstrip())
            spans.append((len(prompt), end))
        return text, spans

    def _marked_spans(self, messages: list[dict], tools) -> tuple[str, list[tuple[int, int]]]:
        chunks, spans = [], []
        token = _GENERATION_SPANS.set((chunks, spans))
        try:
            self._chunks(messages, False, tools, chunks)
        finally:
            _GENERATION_SPANS.reset(token)
        return "".join(chunks), [span for span in spans if span[1] > span[0]]


def check_messages(messages, where: str) -> list[dict]:
    """The messages of one example, each {"role": one of ROLES, "content": str}, as transformers'
    chat templates take them; UserError naming `where` (file:line) otherwise. Content given as a
    list of text parts ([{"type": "text", "text": ...}]) is joined into one string; an assistant
    message with `tool_calls` (a list of objects) may have no content, as in OpenAI's format."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise UserError(f"{where}: message {i} must be an object with 'role' and 'content'")
        if message["role"] not in ROLES:
            raise UserError(f"{where}: message {i} has unknown role {message['role']!r}: use one of {', '.join(ROLES)}")
        calls, content = message.get("tool_calls"), message.get("content")
        if calls is not None and (
            message["role"] != "assistant" or not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls)
        ):
            raise UserError(f"{where}: message {i} has tool_calls: they are a list of objects, on an assistant message")
        checked.append({key: value for key, value in message.items() if value is not None})
        if isinstance(content, list):
            checked[-1]["content"] = text_of_parts(content)
            if checked[-1]["content"] is None:
                kinds = [p.get("type") if isinstance(p, dict) else type(p).__name__ for p in content]
                kind = next((k for k in kinds if k != "text"), "text without a string")
                raise UserError(
                    f"{where}: message {i} has a content part of type {kind!r}: nnxlm's models read text parts alone"
                )
        elif content is None and calls:
            pass  # no content key, as transformers (5.x) passes a tool-call turn whose content is null
        elif not isinstance(content, str):
            got = "no content" if content is None else f"content of type {type(content).__name__}"
            raise UserError(f"{where}: message {i} has {got}: give a string (or a list of text parts)")
    return checked


def check_tools(tools, where: str) -> list[dict] | None:
    """An example's `tools` (function schemas for the chat template), None when it has none."""
    if tools is None:
        return None
    if not isinstance(tools, list) or not all(isinstance(tool, dict) for tool in tools):
        raise UserError(f"{where}: 'tools' must be a list of objects (JSON schemas of functions)")
    return tools


def text_of_parts(parts: list) -> str | None:
    """The text of content given as parts ([{"type": "text", "text": ...}, ...]), joined; None when
    a part is not text (an image, audio)."""
    if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in parts):
        return None
    return "".join(part["text"] for part in parts)
