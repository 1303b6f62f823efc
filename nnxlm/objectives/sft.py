"""Supervised fine-tuning: next-token loss on the assistant's part of chat or prompt/completion data."""

import dataclasses
import sys

from etils import epath

from nnxlm.data.chat import BUILTIN_TEMPLATE, ChatTemplate
from nnxlm.data.sft import LOSS_ON, OVERLONG, make_sft_dataset
from nnxlm.errors import UserError
from nnxlm.objectives.next_token import NextToken

_TOLD: set[str] = set()  # tokenizers already said to have no chat template


@dataclasses.dataclass(frozen=True)
class SFT(NextToken):
    """NextToken's loss on examples formatted by nnxlm.data.sft: packed whole, never split across
    rows, the loss only where loss_on says.

    Args:
      loss_on: "assistant" (default): the assistant turns (or the completion) carry the loss, with
        their end-of-turn token; "all": every token does.
      overlong: an example longer than seq_len + 1 tokens is cut to fit ("truncate") or left out
        ("drop"); both are counted in the logged `truncated` / `dropped`.
      chat_template: path of a Jinja chat template to use instead of the tokenizer's own (the
        chat_template.jinja or tokenizer_config.json beside it); with neither, nnxlm's built-in
        template (nnxlm.data.chat.BUILTIN_TEMPLATE) is used and the run says so.
    The z-loss, MoE balance and multi-token prediction weights are NextToken's.
    """

    loss_on: str = "assistant"
    overlong: str = "truncate"
    chat_template: str | None = None

    def __post_init__(self):
        if self.loss_on not in LOSS_ON:
            raise UserError(f"SFT loss_on is {self.loss_on!r}: use one of {', '.join(LOSS_ON)}")
        if self.overlong not in OVERLONG:
            raise UserError(f"SFT overlong is {self.overlong!r}: use one of {', '.join(OVERLONG)}")

    def template(self, tokenizer) -> ChatTemplate:
        """The chat template examples are rendered with (see chat_template)."""
        return chat_template(tokenizer, self.chat_template)

    def baseline(self, source, tokenizer) -> None:
        return None

    def dataset(self, source, tokenizer, **settings):
        template = self.template(tokenizer)
        return make_sft_dataset(source, tokenizer, template, loss_on=self.loss_on, overlong=self.overlong, **settings)

    def sample_text(self, prompt: str, completion: str) -> str:
        """How a sample completion prints: the user's turn, then the assistant's answer."""
        return f"{prompt}\n>>> {completion}"

    def prompt_ids(self, tokenizer, text: str) -> list[int]:
        """The chat template's rendering of one user turn `text` and the assistant's header."""
        return user_turn_ids(tokenizer, text, self.chat_template)


def chat_template(tokenizer, path: str | None = None) -> ChatTemplate:
    """The template at `path`, else the tokenizer's own (and its tool_use one), else nnxlm's built-in
    one (said once)."""
    tool_template = None
    if path is not None:
        try:
            text = epath.Path(path).read_text()
        except OSError as e:
            raise UserError(f"chat template {path} cannot be read ({e.strerror}): fix the path") from None
    elif getattr(tokenizer, "chat_template", None):
        text, tool_template = tokenizer.chat_template, getattr(tokenizer, "tool_chat_template", None)
    else:
        if repr(tokenizer) not in _TOLD:  # once a process
            _TOLD.add(repr(tokenizer))
            print(f"nnxlm: {tokenizer} has no chat template: using nnxlm's built-in one", file=sys.stderr)
        text = BUILTIN_TEMPLATE
    return ChatTemplate(text, tokenizer.special_tokens(), tool_template)


def user_turn_ids(tokenizer, text: str, template_path: str | None = None) -> list[int]:
    """The ids of one user turn `text` and the assistant's header, in chat_template(tokenizer, path)."""
    template = chat_template(tokenizer, template_path)
    return tokenizer.encode_with_offsets(
        template.render([{"role": "user", "content": text}], add_generation_prompt=True)
    )[0]
