"""An instruction set made from this machine's Python: "write the docstring of this function".

`PythonDocstrings` turns the functions of the standard library (the files of PythonStdlib's split,
so a model pretrained on the train split is evaluated on functions it never saw) into chat
examples: the user gives a function's source with its docstring taken out, the assistant answers
with the docstring's first paragraph. Only short functions and summaries are kept, so an example
fits a few hundred tokens. The fine-tuning demo (recipes/sft.py) trains on it.
"""

import ast
import dataclasses
import functools
import inspect
import random
import zlib

from nnxlm.data.sources import PythonStdlib, read_text_file
from nnxlm.errors import UserError

QUESTION = "Write the docstring of this Python function.\n\n"


@functools.cache  # a few hundred files' short functions
def _functions(path: str, max_source: int, max_answer: int) -> dict[int, tuple[str, str]]:
    """{line: (source without its docstring, first paragraph of the docstring)} of a file's functions."""
    text = read_text_file(path)
    try:
        tree = ast.parse(text)
    except SyntaxError:  # lib2to3 test data and the like
        return {}
    lines = text.splitlines()
    found = {}
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        doc = ast.get_docstring(node)
        first = node.body[0]
        if not doc or len(node.body) < 2 or node.end_lineno is None:
            continue
        summary = inspect.cleandoc(doc).split("\n\n")[0].strip()
        start = node.lineno - 1 - len(node.decorator_list)
        kept = lines[start : first.lineno - 1] + lines[first.end_lineno : node.end_lineno]
        indent = min((len(line) - len(line.lstrip()) for line in kept if line.strip()), default=0)
        source = "\n".join(line[indent:] for line in kept).strip("\n")
        if len(source) <= max_source and 8 <= len(summary) <= max_answer:
            found[node.lineno] = (source, summary)
    return found


@dataclasses.dataclass(frozen=True)
class PythonDocstrings:
    """Chat examples {"messages": [user: QUESTION + code, assistant: summary]} from the standard
    library's functions (see the module docstring). max_source and max_answer bound the
    characters of the code and of the answer."""

    split: str = "train"
    eval_fraction: float = 0.02
    max_source: int = 600
    max_answer: int = 240

    def __post_init__(self):
        PythonStdlib(split=self.split, eval_fraction=self.eval_fraction)  # checks split and fraction

    def documents(self) -> list[tuple[str, int]]:
        """(file, line of the function) of every example, sorted."""
        files = PythonStdlib(split=self.split, eval_fraction=self.eval_fraction).documents()
        docs = [(path, line) for path in files for line in sorted(_functions(path, self.max_source, self.max_answer))]
        if not docs:
            raise UserError(f"no documented functions found in the {self.split!r} split of the standard library")
        return docs

    def where(self, item: tuple[str, int]) -> str:
        return f"{item[0]}:{item[1]}"

    def load(self, item: tuple[str, int]) -> dict:
        source, summary = _functions(item[0], self.max_source, self.max_answer)[item[1]]
        question = f"{QUESTION}```python\n{source}\n```"
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": summary}]}


@dataclasses.dataclass(frozen=True)
class PythonDocstringPairs(PythonDocstrings):
    """Preference pairs from the same functions: the prompt is PythonDocstrings' question, the
    chosen answer the function's own summary, the rejected one the same words shuffled (the same
    shuffle every run, never the original order)."""

    def load(self, item: tuple[str, int]) -> dict:
        messages = super().load(item)["messages"]
        words = messages[1]["content"].split()
        shuffled = list(words)
        random.Random(zlib.crc32(self.where(item).encode())).shuffle(shuffled)
        if shuffled == words:  # one word, or the shuffle left it as it was: reverse it
            shuffled = words[::-1] if len(set(words)) > 1 else [*words, *words]
        return {
            "prompt": messages[:1],
            "chosen": messages[1:],
            "rejected": [{"role": "assistant", "content": " ".join(shuffled)}],
        }
