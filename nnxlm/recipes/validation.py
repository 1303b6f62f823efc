"""Every value of a recipe, checked before anything is built, run or written.

`check_recipe(cfg)` walks a resolved fiddle config and applies the RULES of each callable it
holds (a class or a function: Trainer, Transformer, Attention, AdamW, ...). The first bad value
raises UserError with one line: the field's dotted path (as `set:` overrides name it), its value
and the fix, e.g.

    recipe field model.block.attention.num_kv_heads is 3: num_heads (8) must divide by it; use 1, 2, 4 or 8

A rule is a function (values, where, context): `values` are the node's arguments with defaults,
`where` its path, `context` what enclosing nodes pass down (the Trainer's mesh). Values a parent
passes at build time (a block's d_model) are not in the recipe and are not checked. The modules'
own ValueErrors stay as a second line of defence for models built outside recipes; the plain-value
dataclasses that check themselves when built (LoRA rank and dropout, SFT's loss_on and overlong)
keep those checks, which also run before anything else (fdl.build of the recipe).
"""

import math
import re

import fiddle as fdl
import jax.numpy as jnp

from nnxlm.data import ArrayRecordFiles, HFDataset, Mixture, ParquetFiles
from nnxlm.data.sources import SPLITS, JsonlFiles, PythonStdlib, Synthetic, TextFiles
from nnxlm.errors import UserError
from nnxlm.modules import Attention, DecoderBlock, GatedMLP, RMSNorm, Transformer
from nnxlm.modules.blockwise import IMPLEMENTATIONS
from nnxlm.modules.fused_attention import PATTERN_FIX, kernel_problem
from nnxlm.modules.lora import TARGETS, LoRA
from nnxlm.modules.mla import MLA, YARN_KEYS
from nnxlm.modules.mlp import ACTIVATIONS
from nnxlm.modules.moe import DISPATCHES, ROUTERS, MoE
from nnxlm.modules.pipeline import SCHEDULES, PipelineSchedule, schedule_problem
from nnxlm.modules.ring import CONTEXT_PARALLEL
from nnxlm.modules.rope import SCALING_TYPES
from nnxlm.modules.transformer import PATTERN_FIELDS, REMAT_POLICIES
from nnxlm.objectives import NextToken
from nnxlm.optim import AdamW
from nnxlm.sharding import DEFAULT_RULES, MESH_AXES, logical_to_spec, mesh_axes_of
from nnxlm.trainer import Trainer

_MISSING = object()


def check_recipe(cfg: fdl.Buildable, where: str = "") -> None:
    """UserError naming the first bad value of `cfg`; `where` is the path of cfg itself ("model"
    for a model recipe alone), so that messages name fields as in a Trainer recipe."""
    _walk(cfg, where, {})


def _walk(node, where: str, context: dict) -> None:
    if isinstance(node, fdl.Buildable):
        values = fdl.ordered_arguments(node, include_defaults=True)
        function = node.__fn_or_cls__
        owners = getattr(function, "__mro__", (function,))  # SFT gets NextToken's rules
        for rule in (*GENERIC, *(rule for owner in owners for rule in RULES.get(owner, ()))):
            rule(values, where, context)
        if isinstance(values.get("mesh"), dict):
            context = {**context, "mesh": values["mesh"]}
        children = values.items()
    elif isinstance(node, (list, tuple)):
        children = enumerate(node)
    elif isinstance(node, dict):
        children = node.items()
    else:
        return
    for name, child in children:
        _walk(child, _join(where, name), context)


def _join(where: str, name) -> str:
    return f"{where}.{name}" if where else str(name)


def _fail(where: str, field: str, value, fix: str):
    raise UserError(f"recipe field {_join(where, field)} is {value!r}: {fix}")


def _is_number(value) -> bool:
    """A finite int or float (1e999 parses as inf, which no field means)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ------------------------------------------------------------------------------------------------
# Rules of one field each, made by these factories.


def _each(fields, ok, fix: str, optional: bool = False):
    """A rule failing on the first of `fields` whose value is not ok(value); values a parent passes
    (absent) and sub-configs are left alone, and None too when optional."""
    fix += " (or None)" if optional else ""

    def rule(values, where, context):
        for field in fields:
            value = values.get(field, _MISSING)
            if value is _MISSING or (optional and value is None) or isinstance(value, fdl.Buildable):
                continue
            if not ok(value):
                _fail(where, field, value, fix)

    return rule


def whole(*fields, least: int = 1, optional: bool = False):
    """Whole numbers of at least `least` (a bool or 2.0 is not one)."""

    def ok(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= least

    return _each(fields, ok, f"use a whole number of at least {least}", optional)


def number(*fields, low, high=None, open_low=False, open_high=False, optional=False):
    """Numbers in an interval, e.g. number("top_p", low=0, high=1, open_low=True) is (0, 1]."""
    if high is None:
        fix = f"use a number {'>' if open_low else '>='} {low}"
    else:
        fix = f"use a number in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"

    def ok(value) -> bool:  # False for NaN
        if not _is_number(value) or not (value > low if open_low else value >= low):
            return False
        return high is None or (value < high if open_high else value <= high)

    return _each(fields, ok, fix, optional)


def one_of(field: str, choices):
    return _each((field,), lambda value: value in choices, f"use one of {', '.join(map(repr, choices))}")


def _compiles(value) -> bool:
    try:
        re.compile(value)
        return True
    except (re.error, TypeError):
        return False


def _floating(value) -> bool:
    try:
        return bool(jnp.issubdtype(jnp.dtype(value), jnp.floating))
    except TypeError:
        return False


def _patterns(value) -> bool:  # a glob or a non-empty list of globs
    globs = [value] if isinstance(value, str) else value
    return isinstance(globs, (list, tuple)) and bool(globs) and all(isinstance(g, str) and g for g in globs)


# ------------------------------------------------------------------------------------------------
# Rules across fields.


def _divisors(n: int) -> str:
    found = [str(d) for d in range(1, n + 1) if n % d == 0]
    return ", ".join(found[:-1]) + " or " + found[-1] if len(found) > 1 else found[0]


def _heads(values, where, context):
    heads, kv_heads = values.get("num_heads"), values.get("num_kv_heads")
    if kv_heads is not None and heads % kv_heads:
        _fail(where, "num_kv_heads", kv_heads, f"num_heads ({heads}) must divide by it; use {_divisors(heads)}")
    if values.get("head_dim", 0) % 2:
        head_dim = values["head_dim"]
        _fail(where, "head_dim", head_dim, f"rotary embeddings need an even head_dim; use {head_dim + 1}")


def _rope_scaling(values, where, context):
    scaling = values.get("rope_scaling")
    if not scaling:
        return
    field = "rope_scaling"
    if not isinstance(scaling, dict) or scaling.get("type") not in SCALING_TYPES:
        kind = scaling.get("type") if isinstance(scaling, dict) else scaling
        _fail(where, field + ".type", kind, f"use one of {', '.join(map(repr, SCALING_TYPES))}")
    needed = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    for key in needed if scaling["type"] == "llama3" else needed[:1]:
        if not _is_number(scaling.get(key)) or scaling[key] <= 0:
            _fail(where, f"{field}.{key}", scaling.get(key), "use a number > 0")
    if scaling["type"] == "llama3" and scaling["low_freq_factor"] == scaling["high_freq_factor"]:
        _fail(where, f"{field}.high_freq_factor", scaling["high_freq_factor"], "make it differ from low_freq_factor")


def _mla(values, where, context):
    if values.get("qk_rope_head_dim", 0) % 2:
        size = values["qk_rope_head_dim"]
        _fail(where, "qk_rope_head_dim", size, f"rotary embeddings need an even size; use {size + 1}")
    scaling = values.get("rope_scaling")
    if not scaling:
        return
    kind = scaling.get("type", scaling.get("rope_type")) if isinstance(scaling, dict) else scaling
    if kind != "yarn":
        _fail(where, "rope_scaling.type", kind, "MLA takes 'yarn' rope scaling only")
    for key in sorted(set(scaling) - YARN_KEYS):
        _fail(where, f"rope_scaling.{key}", scaling[key], f"remove it; yarn takes {', '.join(sorted(YARN_KEYS))}")
    for key in ("factor", "original_max_position_embeddings"):
        if not _is_number(scaling.get(key)) or scaling[key] <= 0:
            _fail(where, f"rope_scaling.{key}", scaling.get(key), "use a number > 0")


def _kernel(values, where, context):
    """What a fused attention kernel cannot honour (nnxlm.modules.fused_attention), before a build."""
    implementation = values.get("implementation")
    problem = kernel_problem(implementation, block_size=values.get("block_size"), softcap=values.get("softcap"))
    if problem is not None:
        _fail(where, *problem)


def _pattern_kernel(values, where, context):
    """A layer_pattern's windows reach the attention traced, which splash cannot take."""
    block = values.get("block")
    if values.get("layer_pattern") is None or not isinstance(block, fdl.Buildable):
        return
    attention = fdl.ordered_arguments(block, include_defaults=True).get("attention")
    if isinstance(attention, fdl.Buildable):
        implementation = fdl.ordered_arguments(attention, include_defaults=True).get("implementation")
        if implementation == "splash":
            _fail(where, "block.attention.implementation", implementation, PATTERN_FIX)


def _experts(values, where, context):
    experts, k = values.get("num_experts"), values.get("num_experts_per_token")
    groups, kept = values.get("num_groups", 1), values.get("num_groups_per_token", 1)
    if k > experts:
        _fail(where, "num_experts_per_token", k, f"use 1 to num_experts ({experts})")
    if values.get("shared_hidden_dim") is not None and not values.get("num_shared_experts"):
        _fail(where, "num_shared_experts", values.get("num_shared_experts"), "set it too: shared_hidden_dim is set")
    if (groups, kept) != (1, 1):
        if values.get("router") != "sigmoid":
            _fail(where, "router", values.get("router"), f"group-limited routing (num_groups {groups}) needs 'sigmoid'")
        if experts % groups:
            _fail(where, "num_groups", groups, f"num_experts ({experts}) must divide by it; use {_divisors(experts)}")
        if kept > groups:
            _fail(where, "num_groups_per_token", kept, f"use 1 to num_groups ({groups})")
        if k > kept * (experts // groups):
            _fail(
                where,
                "num_experts_per_token",
                k,
                f"use at most the {kept * (experts // groups)} experts of kept groups",
            )
    shards = (context.get("mesh") or {}).get("expert", 1)
    if isinstance(shards, int) and shards > 1 and experts % shards:
        _fail(where, "num_experts", experts, f"the mesh's expert axis ({shards}) must divide it")


def _layers(values, where, context):
    layers, first = values.get("num_layers"), values.get("num_first_layers", 0)
    if not isinstance(layers, int):
        return
    if first >= layers:
        _fail(where, "num_first_layers", first, f"use 0 to num_layers - 1 ({layers - 1})")
    if (values.get("first_block") is None) != (first == 0):
        _fail(where, "num_first_layers", first, "give a first_block with 1 or more first layers, or neither")
    pattern_ = values.get("layer_pattern")
    if pattern_ is None:
        return
    if not isinstance(pattern_, (list, tuple)) or not pattern_ or not all(isinstance(e, dict) for e in pattern_):
        _fail(where, "layer_pattern", pattern_, f"give a non-empty tuple of dicts of {', '.join(PATTERN_FIELDS)}")
    for i, entry in enumerate(pattern_):
        for key in sorted(set(entry) - set(PATTERN_FIELDS)):
            _fail(where, f"layer_pattern.{i}.{key}", entry[key], f"remove it; entries take {', '.join(PATTERN_FIELDS)}")
        whole("sliding_window", optional=True)(entry, _join(where, f"layer_pattern.{i}"), context)


def _lengths(values, where, context):
    if values.get("min_length", 1) > values.get("max_length", 1):
        _fail(where, "min_length", values["min_length"], f"use at most max_length ({values['max_length']})")


def _mesh(values, where, context):
    mesh = values.get("mesh")
    if mesh is None:
        return
    if not isinstance(mesh, dict):
        _fail(where, "mesh", mesh, 'give a dict of mesh axis sizes, e.g. {"data": -1}')
    for axis, size in mesh.items():
        if axis not in MESH_AXES:
            _fail(where, f"mesh.{axis}", size, f"no such mesh axis; mesh axes are {', '.join(MESH_AXES)}")
        if isinstance(size, bool) or not isinstance(size, int) or (size < 1 and size != -1):
            _fail(where, f"mesh.{axis}", size, "use a positive size, or -1 for the remaining devices")
    if list(mesh.values()).count(-1) > 1:
        _fail(where, "mesh", mesh, "set at most one axis to -1 (the remaining devices)")
    rules = values.get("sharding_rules") or {}
    for name, axes in rules.items():
        if name not in DEFAULT_RULES:
            _fail(where, f"sharding_rules.{name}", axes, f"no such logical axis; use one of {', '.join(DEFAULT_RULES)}")
        if not isinstance(axes, (str, list, tuple, type(None))) or set(mesh_axes_of(axes)) - set(MESH_AXES):
            _fail(where, f"sharding_rules.{name}", axes, f"use mesh axes of {', '.join(MESH_AXES)} (or None)")


def _batch(values, where, context):
    batch, steps, seq_len = values["batch_size"], values["grad_accum_steps"], values["seq_len"]
    if batch % steps:
        _fail(where, "grad_accum_steps", steps, f"batch_size ({batch}) must divide by it; use {_divisors(batch)}")
    shards = values.get("data_shards")
    if shards is not None and batch % shards:
        _fail(where, "data_shards", shards, f"batch_size ({batch}) must divide by it; use {_divisors(batch)}")
    # the axes of a fixed size must divide the rows and the sequence whatever the -1 axis becomes
    sizes = {axis: size for axis, size in (values.get("mesh") or {}).items() if size != -1}
    spec = logical_to_spec(("batch", "length"), values.get("sharding_rules"))
    for field, size, entry in (("batch_size", batch // steps, spec[0]), ("seq_len", seq_len, spec[1])):
        axes = [axis for axis in mesh_axes_of(entry) if sizes.get(axis, 1) > 1]
        devices = math.prod(sizes[axis] for axis in axes)
        if size % devices:
            split = " x ".join(f"{axis} ({sizes[axis]})" for axis in axes)
            multiple = devices * (steps if field == "batch_size" else 1)  # of every micro-batch's rows
            _fail(where, field, values[field], f"the mesh splits it over {split}; use a multiple of {multiple}")


def _pipeline(values, where, context):
    """What a `pipeline` mesh axis needs of the model and the batch (nnxlm.modules.pipeline)."""
    stages = (values.get("mesh") or {}).get("pipeline", 1)
    model = values.get("model")
    if not isinstance(stages, int) or stages <= 1 or not isinstance(model, fdl.Buildable):
        return
    if values["mesh"].get("expert", 1) != 1:
        fix = "expert parallelism does not run inside pipeline stages yet; drop one of the two axes"
        _fail(where, "mesh.expert", values["mesh"]["expert"], fix)
    layers = fdl.ordered_arguments(model, include_defaults=True)
    if not isinstance(layers.get("num_layers"), int):
        return
    if not layers.get("scan_layers", True):
        _fail(where, "model.scan_layers", False, f"the mesh's pipeline axis ({stages}) needs stacked layers; use True")
    fields = ("pipeline_microbatches", "pipeline_schedule", "pipeline_repeats")
    schedule = PipelineSchedule(*(values[field] for field in fields))
    rows = values["batch_size"] // values["grad_accum_steps"]
    pipelined = layers["num_layers"] - layers.get("num_first_layers", 0)
    problem = schedule_problem(pipelined, rows, stages, schedule)
    if problem is not None:
        field, value, fix = problem
        _fail(where, "model.num_layers" if field == "num_layers" else field, value, fix)
    microbatches, _ = schedule.resolved(stages)
    sizes = {axis: size for axis, size in values["mesh"].items() if size != -1}
    batch_axes = mesh_axes_of(logical_to_spec(("batch",), values.get("sharding_rules"))[0])
    axes = [axis for axis in batch_axes if sizes.get(axis, 1) > 1]
    shards = math.prod(sizes[axis] for axis in axes)
    if (rows // microbatches) % shards:
        split = " x ".join(f"{axis} ({sizes[axis]})" for axis in axes)
        fix = f"its micro-batches of {rows // microbatches} rows are split over {split}; use fewer micro-batches"
        _fail(where, "pipeline_microbatches", microbatches, fix)


def _ring_in_pipeline(values, where, context):
    stages = (context.get("mesh") or {}).get("pipeline", 1)
    if values.get("context_parallel") == "ring" and stages != 1:
        fix = "ring attention does not run inside pipeline stages yet; use 'all_gather' or drop the pipeline axis"
        _fail(where, "context_parallel", "ring", fix)


def _data_vocabulary(values, where, context):
    model_vocab = getattr(values.get("model"), "vocab_size", None)
    if not isinstance(model_vocab, int) or model_vocab < 1:
        return  # the model's own rules name a bad vocab_size
    for field in ("train_data", "eval_data"):
        source = values.get(field)
        named = [(field, source)]
        if isinstance(source, fdl.Buildable) and source.__fn_or_cls__ is Mixture:  # each of its sources
            named = [(f"{field}.sources[{k}]", s) for k, s in enumerate(getattr(source, "sources", None) or ())]
        for name, part in named:
            if isinstance(part, fdl.Buildable) and part.__fn_or_cls__ is Synthetic:
                vocab = fdl.ordered_arguments(part, include_defaults=True)["vocab_size"]
                if isinstance(vocab, int) and vocab > model_vocab:
                    _fail(where, f"{name}.vocab_size", vocab, f"use at most the model's vocab_size ({model_vocab})")


def _lora_targets(values, where, context):
    targets = values.get("targets")
    targets = (targets,) if isinstance(targets, str) else targets
    if not targets:
        _fail(where, "targets", targets, f"name projections, e.g. ('q', 'v'); known: {', '.join(TARGETS)}")
    known = set(TARGETS) | set(TARGETS.values())
    for target in targets:
        if target not in known:
            _fail(where, "targets", target, f"use names of {', '.join(TARGETS)}")


def _tied_head_lora(values, where, context):
    """A tied model's head is its embedding, which LoRA does not adapt: asking for it would train nothing there."""
    lora = values.get("lora")
    if not (isinstance(lora, fdl.Buildable) and values.get("tie_embeddings")):
        return
    targets = lora.targets if "targets" in lora.__arguments__ else ()
    if "head" in ((targets,) if isinstance(targets, str) else tuple(targets or ())):
        _fail(
            where, "lora.targets", "head", "the head is tied to the embedding, which LoRA does not adapt: leave it out"
        )


PROBABILITY = dict(low=0, high=1, open_high=True)
POSITIVE = dict(low=0, open_low=True)
WEIGHT = dict(low=0)

SPLIT = (one_of("split", SPLITS), number("eval_fraction", **PROBABILITY))
GLOBS = _each(("globs",), _patterns, "give a list of file patterns, e.g. ['data/*.txt']")
GENERIC = (_each(("dtype", "param_dtype"), _floating, "use a floating dtype: 'float32', 'bfloat16' or 'float16'"),)
RULES = {
    Trainer: (
        whole("seq_len", "batch_size", "grad_accum_steps", "num_steps", "eval_batches", "keep_checkpoints"),
        whole("log_every", "sample_max_new_tokens", "tokenizer_train_chars"),
        whole("eval_every", "checkpoint_every", "num_workers", "seed", least=0),
        whole("profile_steps", "profile_skip_steps", least=0),
        whole("data_shards", optional=True),
        number("sample_temperature", **WEIGHT),
        number("sample_top_p", low=0, high=1, open_low=True, optional=True),
        number("peak_flops_per_device", **POSITIVE, optional=True),
        _each(("trainable", "freeze"), _compiles, "give 'all', 'lora' or a regular expression", optional=True),
        _mesh,
        one_of("on_nonfinite", ("stop", "skip")),
        _batch,
        whole("pipeline_repeats"),
        whole("pipeline_microbatches", optional=True),
        one_of("pipeline_schedule", SCHEDULES),
        _pipeline,
        _data_vocabulary,
    ),
    Transformer: (
        whole("vocab_size", "d_model", "num_layers"),
        whole("num_first_layers", "mtp_depth", least=0),
        whole("context_length", optional=True),
        one_of("remat_policy", tuple(REMAT_POLICIES)),
        number("final_logit_softcap", **POSITIVE, optional=True),
        _layers,
        _pattern_kernel,
        _tied_head_lora,
    ),
    DecoderBlock: (number("dropout_rate", **PROBABILITY),),
    Attention: (
        whole("num_heads", "num_kv_heads", "head_dim"),
        whole("sliding_window", optional=True),
        number("rope_theta", **POSITIVE),
        number("softcap", "query_pre_attn_scalar", **POSITIVE, optional=True),
        one_of("implementation", IMPLEMENTATIONS),
        one_of("context_parallel", CONTEXT_PARALLEL),
        whole("block_size"),
        _heads,
        _rope_scaling,
        _kernel,
        _ring_in_pipeline,
    ),
    MLA: (
        whole("num_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "block_size"),
        one_of("implementation", IMPLEMENTATIONS),
        one_of("context_parallel", CONTEXT_PARALLEL),
        whole("q_lora_rank", optional=True),
        number("rope_theta", "norm_eps", **POSITIVE),
        _mla,
        _kernel,
        _ring_in_pipeline,
    ),
    GatedMLP: (whole("hidden_dim"), one_of("activation", tuple(ACTIVATIONS))),
    MoE: (
        whole("num_experts", "num_experts_per_token", "expert_hidden_dim", "num_groups", "num_groups_per_token"),
        whole("num_shared_experts", least=0),
        whole("shared_hidden_dim", optional=True),
        number("routed_scaling_factor", **POSITIVE),
        number("capacity_factor", **POSITIVE, optional=True),
        one_of("activation", tuple(ACTIVATIONS)),
        one_of("router", ROUTERS),
        one_of("dispatch", DISPATCHES),
        _experts,
    ),
    RMSNorm: (number("eps", **POSITIVE),),
    LoRA: (number("alpha", **POSITIVE), _lora_targets),
    AdamW: (
        number("learning_rate", "eps", **POSITIVE),
        whole("warmup_steps", least=0),
        whole("decay_steps", optional=True),
        number("min_lr_ratio", low=0, high=1),
        number("b1", "b2", **PROBABILITY),
        number("weight_decay", **WEIGHT),
        number("clip_norm", **POSITIVE, optional=True),
    ),
    NextToken: (number("z_loss_weight", "moe_balance_weight", "mtp_loss_weight", **WEIGHT),),
    Synthetic: (
        whole("num_documents", "min_length", "max_length"),
        whole("vocab_size", least=4),
        whole("seed", least=0),
        *SPLIT,
        _lengths,
    ),
    TextFiles: (*SPLIT, GLOBS),
    JsonlFiles: (*SPLIT, GLOBS),
    ParquetFiles: (*SPLIT, GLOBS),
    ArrayRecordFiles: (*SPLIT, GLOBS),
    HFDataset: (*SPLIT, whole("min_chars", least=0)),
    PythonStdlib: SPLIT,
}
