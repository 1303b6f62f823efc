"""A run directory made ready to serve: model (on one device or tensor parallel), tokenizer, chat
template and end tokens, shared by `nnxlm serve` and `nnxlm chat`."""

from __future__ import annotations

import dataclasses

from etils import epath

from nnxlm.errors import UserError

# The context served by default when the model's own is longer: a converted Llama 3.2 is made for
# 131,072 tokens, and each slot's KV cache holds the whole context (Llama 3 8B in bf16: 32 layers x 8
# KV heads x 128 x 2 (k, v) x 2 bytes = 128 KiB a token; 16 slots x 4,096 tokens = 8 GiB).
DEFAULT_CONTEXT_CAP = 4096

# end-of-turn tokens of common chat templates: generation also stops at these when the vocabulary has them
END_OF_TURN = ("<|eot_id|>", "<|im_end|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "<|eom_id|>")


@dataclasses.dataclass
class Served:
    model: object
    tokenizer: object
    template: object
    end_ids: tuple[int, ...]
    name: str
    max_length: int
    mesh: object
    context_length: int | None = None  # the model's own context, where known


def serving_length(max_length: int | None, seq_len: int | None, context_length: int | None) -> int:
    """Tokens of prompt and completion a slot holds: --max_length, up to the model's context; by
    default the run's seq_len, or for a model whose context is known, that context capped at
    DEFAULT_CONTEXT_CAP (or at seq_len, when it trained longer)."""
    if max_length is not None:
        if context_length is not None and max_length > context_length:
            raise UserError(
                f"--max_length {max_length} is past the model's context of {context_length} tokens "
                f"(max_position_embeddings): give at most {context_length}"
            )
        return max_length
    if context_length is None:
        return seq_len or 2048
    return min(context_length, max(seq_len or 0, DEFAULT_CONTEXT_CAP))


def load(checkpoint: str, tensor_parallel: int = 1, max_length: int | None = None, chat_template: str | None = None):
    """Loads what serving a run directory (or checkpoint) needs; UserError on bad input."""
    import jax

    from nnxlm.checkpointing import find_checkpoint, load_model, load_recipe
    from nnxlm.data import find_tokenizer, load_tokenizer
    from nnxlm.objectives.sft import chat_template as find_chat_template
    from nnxlm.sharding import make_mesh

    if tensor_parallel < 1 or tensor_parallel > len(jax.local_devices()):
        raise UserError(
            f"--tensor_parallel {tensor_parallel}: this host has {len(jax.local_devices())} devices; "
            "give 1 to that many"
        )
    if max_length is not None and max_length < 2:
        raise UserError(f"--max_length {max_length}: give at least 2 tokens (prompt and completion)")
    directory, _ = find_checkpoint(checkpoint)
    recipe = load_recipe(checkpoint)
    context_length = getattr(recipe.model, "context_length", None)
    length = serving_length(max_length, getattr(recipe, "seq_len", None), context_length)
    run_dir = epath.Path(directory).parent
    tokenizer_path = find_tokenizer(run_dir, recipe.tokenizer_path)
    if not epath.Path(tokenizer_path).exists():
        raise UserError(f"no tokenizer at {tokenizer_path}: serving needs the run's tokenizer.model or tokenizer.json")
    tokenizer = load_tokenizer(tokenizer_path)
    mesh = None
    if tensor_parallel > 1:
        mesh = make_mesh({"tensor": tensor_parallel}, devices=jax.local_devices()[:tensor_parallel])
    model = load_model(checkpoint, mesh=mesh)
    vocab_ids = getattr(tokenizer, "_to_id", None)
    end_ids = tuple(i for i in (vocab_ids(t) for t in END_OF_TURN) if i is not None) if vocab_ids else ()
    name = run_dir.name
    template = find_chat_template(tokenizer, chat_template)
    return Served(model, tokenizer, template, end_ids, name, length, mesh, context_length)
