"""Reward functions for GRPO, and how a run calls them.

A reward function takes the batch's prompts and completions (one entry per completion: a prompt
repeats for each of its group's completions) and, as keyword arguments, the other fields of each
prompt's record (e.g. `answer`), also one entry per completion, and returns one number per
completion:

    def my_reward(prompts, completions, answer, **fields) -> list[float]: ...

(the signature TRL's GRPOTrainer uses). As in TRL, a text prompt's completion is a string and a
conversation's (a prompt given as a list of messages) is a list of one assistant message,
[{"role": "assistant", "content": text}]; the built-in functions take either.

A recipe names reward functions as Python callables: the built-in ones below, configured with
fdl.Partial, or a function defined in the recipe's own file.

    exact_match    1.0 where the completion, stripped, equals the record's `answer` field
    regex_match    1.0 where a regular expression matches the completion (`pattern=`)
    length         closeness of the completion's length in characters to `target`
"""

import functools
import math
import numbers
import re
from collections.abc import Callable, Sequence

import numpy as np

from nnxlm.errors import UserError


def as_conversation(completion: str) -> list[dict]:
    """A conversation's completion as TRL passes it to reward functions: one assistant message."""
    return [{"role": "assistant", "content": completion}]


def text(completion) -> str:
    """A completion's text: itself, or the content of a conversation's assistant message."""
    if isinstance(completion, list):
        return "".join(str(message.get("content") or "") for message in completion)
    return completion


def exact_match(prompts: list[str], completions: list[str], answer: list, **fields) -> list[float]:
    """1.0 where the completion, without surrounding whitespace, is the record's `answer`, else 0.0."""
    del prompts, fields
    return [
        float(text(completion).strip() == str(expected).strip())
        for completion, expected in zip(completions, answer, strict=True)
    ]


def regex_match(prompts: list[str], completions: list[str], pattern: str = r".", full: bool = False, **fields):
    """1.0 where `pattern` matches the completion (anywhere, or the whole of it when `full`), else 0.0."""
    del prompts, fields
    compiled = re.compile(pattern, re.DOTALL)
    match = compiled.fullmatch if full else compiled.search
    return [float(match(text(completion)) is not None) for completion in completions]


def length(prompts: list[str], completions: list[str], target: int = 100, **fields) -> list[float]:
    """1 - |len(completion) - target| / target, at least 0: 1.0 for a completion of exactly `target`
    characters, falling linearly to 0 at 0 and at twice the target."""
    del prompts, fields
    return [max(0.0, 1.0 - abs(len(text(c)) - target) / target) for c in completions]


BUILTIN = {"exact_match": exact_match, "regex_match": regex_match, "length": length}


def reward_name(fn: Callable) -> str:
    """How logs and messages name a reward function (a partial by the function it wraps)."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return getattr(fn, "__name__", type(fn).__name__)


def score(fn: Callable, prompts: list[str], completions: list[str], fields: dict[str, list], step: int) -> list[float]:
    """fn's rewards of the completions, checked: UserError naming the step, the function and the
    prompt when it raises or does not return one finite number per completion."""
    name = reward_name(fn)
    try:
        rewards = fn(prompts=prompts, completions=completions, **fields)
    except Exception as e:  # find the completion it fails on, to name its prompt
        culprit = _first_failing(fn, prompts, completions, fields)
        where = f" on the completion of prompt {prompts[culprit]!r}" if culprit is not None else ""
        raise UserError(
            f"step {step}: reward function {name} raised {type(e).__name__}: {e}{where}; fix the function "
            f"(it is called as {name}(prompts=[...], completions=[...], <record fields>=[...]))"
        ) from e
    if isinstance(rewards, np.ndarray) and rewards.ndim == 1:  # as TRL takes them
        rewards = rewards.tolist()
    if isinstance(rewards, str | bytes) or not isinstance(rewards, Sequence) or len(rewards) != len(completions):
        got = f"{len(rewards)} values" if isinstance(rewards, Sequence) else repr(rewards)[:60]
        raise UserError(
            f"step {step}: reward function {name} returned {got} for {len(completions)} completions: return a "
            "list with one number per completion"
        )
    for prompt, reward in zip(prompts, rewards, strict=True):
        # any real number: bools (a check passed: 1.0) and NumPy's scalars too, as TRL takes them
        if not isinstance(reward, numbers.Real) or not math.isfinite(reward):
            raise UserError(
                f"step {step}: reward function {name} returned {reward!r} for a completion of prompt {prompt!r}: "
                "a reward is a finite number (or a bool)"
            )
    return [float(r) for r in rewards]


def _first_failing(fn, prompts, completions, fields) -> int | None:
    for i in range(len(completions)):
        try:
            fn(
                prompts=prompts[i : i + 1],
                completions=completions[i : i + 1],
                **{k: v[i : i + 1] for k, v in fields.items()},
            )
        except Exception:
            return i
    return None


def check_reward_functions(functions: Sequence[Callable], weights: Sequence[float] | None) -> None:
    """UserError for a recipe whose reward functions cannot be used."""
    if not functions:
        raise UserError("GRPO has no reward function: set rewards, e.g. [nnxlm.rewards.exact_match]")
    for fn in functions:
        if not callable(fn):
            raise UserError(f"GRPO reward {fn!r} is not callable: name a function (nnxlm.rewards or your recipe's)")
    if weights is not None and len(weights) != len(functions):
        raise UserError(f"GRPO has {len(functions)} reward functions and {len(weights)} reward_weights: give one each")
