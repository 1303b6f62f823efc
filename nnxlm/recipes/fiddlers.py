"""Fiddlers: functions that edit a recipe in place, usable as `--recipe fiddler:NAME(args)`."""

import copy

import fiddle as fdl
from etils import epath

from nnxlm.data import ArrayRecordFiles, HFDataset, JsonlFiles, ParquetFiles, Synthetic, TextFiles
from nnxlm.errors import UserError
from nnxlm.modules.lora import LoRA
from nnxlm.modules.quantization import Quantization
from nnxlm.objectives import DPO, GRPO, SFT


def loop_layers(cfg: fdl.Config) -> None:
    """Apply layers in a Python loop instead of nnx.scan (slower to compile, easier to debug)."""
    cfg.model.scan_layers = False


def remat(cfg: fdl.Config, policy: str = "full") -> None:
    """Recompute activations in the backward pass: "full", "dots" or "none"."""
    cfg.model.remat_policy = policy


def bfloat16(cfg: fdl.Config) -> None:
    """Compute in bfloat16, keep float32 parameters and optimizer state."""
    cfg.model.dtype = "bfloat16"


def synthetic_data(cfg: fdl.Config, num_documents: int = 2000) -> None:
    """Train and evaluate on synthetic token documents sized to the model's vocabulary (no tokenizer)."""
    vocab = cfg.model.vocab_size
    cfg.train_data = fdl.Config(
        Synthetic, num_documents=num_documents, vocab_size=vocab, split="train", eval_fraction=0.1
    )
    cfg.eval_data = fdl.Config(
        Synthetic, num_documents=num_documents, vocab_size=vocab, split="eval", eval_fraction=0.1
    )


def quick(cfg: fdl.Config, steps: int = 20) -> None:
    """A short smoke run: `steps` steps, checkpoint and evaluate at the end, small batches."""
    cfg.num_steps = steps
    cfg.checkpoint_every = steps
    cfg.eval_every = steps
    cfg.eval_batches = 2
    cfg.optimizer.warmup_steps = min(cfg.optimizer.warmup_steps, steps // 4)


def text_files(cfg: fdl.Config, train: str, eval: str | None = None, eval_fraction: float = 0.01) -> None:
    """Train on text files matching the glob `train` (one document a file); evaluate on `eval`, or
    on a held-out eval_fraction of the training files when no eval glob is given."""
    _files(cfg, TextFiles, train, eval, eval_fraction)


def jsonl_files(
    cfg: fdl.Config, train: str, eval: str | None = None, field: str = "text", eval_fraction: float = 0.01
) -> None:
    """Like text_files for JSON Lines files, one document a line, its text in `field`."""
    _files(cfg, JsonlFiles, train, eval, eval_fraction, field=field)


def parquet_files(
    cfg: fdl.Config, train: str, eval: str | None = None, field: str = "text", eval_fraction: float = 0.01
) -> None:
    """Like text_files for Parquet files, one document a row, its text in the column `field`."""
    _files(cfg, ParquetFiles, train, eval, eval_fraction, field=field)


def array_record_files(
    cfg: fdl.Config, train: str, eval: str | None = None, field: str | None = None, eval_fraction: float = 0.01
) -> None:
    """Like text_files for ArrayRecord files, one document a record: raw UTF-8 text (field=None), or
    the text `field` of JSON-object or tf.train.Example records."""
    _files(cfg, ArrayRecordFiles, train, eval, eval_fraction, field=field)


def hf_dataset(
    cfg: fdl.Config,
    path: str,
    field: str = "text",
    eval_fraction: float = 0.01,
    eval_split: str | None = None,
    **options,
) -> None:
    """Train on a Hugging Face dataset (nnxlm.data.HFDataset): a save_to_disk directory, a builder
    with files (hf_dataset('parquet', data_files='data/*.parquet')) or a Hub name; evaluate on a
    held-out eval_fraction of its rows, or on the dataset's own split `eval_split` (e.g. 'validation').
    options are HFDataset's: name, data_files, data_dir, hf_split, filters, min_chars, revision, cache_dir."""
    if eval_split is None:
        train = fdl.Config(HFDataset, path=path, field=field, split="train", eval_fraction=eval_fraction, **options)
        cfg.train_data, cfg.eval_data = train, copy.deepcopy(train)
        cfg.eval_data.split = "eval"
    else:
        cfg.train_data = fdl.Config(HFDataset, path=path, field=field, **options)
        cfg.eval_data = fdl.Config(HFDataset, path=path, field=field, **{**options, "hf_split": eval_split})


def _files(cfg, source, train, eval, eval_fraction, **fields) -> None:
    if eval is None:
        cfg.train_data = fdl.Config(source, globs=[train], split="train", eval_fraction=eval_fraction, **fields)
        cfg.eval_data = fdl.Config(source, globs=[train], split="eval", eval_fraction=eval_fraction, **fields)
    else:
        cfg.train_data = fdl.Config(source, globs=[train], **fields)
        cfg.eval_data = fdl.Config(source, globs=[eval], **fields)


def sft(
    cfg: fdl.Config,
    train: str,
    eval: str | None = None,
    eval_fraction: float = 0.01,
    loss_on: str = "assistant",
    overlong: str = "truncate",
    chat_template: str | None = None,
) -> None:
    """Supervised fine-tuning on the JSON Lines files matching `train`: one example a line, with
    "messages" or "prompt" / "completion" (nnxlm.data.sft); evaluate on `eval`, or on a held-out
    eval_fraction of the examples. loss_on, overlong and chat_template are SFT's (nnxlm.objectives)."""
    _files(cfg, JsonlFiles, train, eval, eval_fraction, field=None)
    cfg.objective = fdl.Config(SFT, loss_on=loss_on, overlong=overlong, chat_template=chat_template)


def dpo(
    cfg: fdl.Config,
    train: str,
    eval: str | None = None,
    eval_fraction: float = 0.01,
    beta: float = 0.1,
    loss: str = "sigmoid",
    label_smoothing: float = 0.0,
    overlong: str = "truncate",
    chat_template: str | None = None,
    cache_reference: bool = False,
) -> None:
    """Direct preference optimisation on the JSON Lines files matching `train`: one pair a line,
    {"prompt", "chosen", "rejected"} as text or messages (nnxlm.data.preferences); evaluate on
    `eval`, or on a held-out eval_fraction of the pairs. The other arguments are DPO's
    (nnxlm.objectives.dpo); the reference is the starting model (with fiddler:lora, its base)."""
    _files(cfg, JsonlFiles, train, eval, eval_fraction, field=None)
    cfg.objective = fdl.Config(
        DPO, beta=beta, loss=loss, label_smoothing=label_smoothing, overlong=overlong, chat_template=chat_template,
        cache_reference=cache_reference,
    )  # fmt: skip


def grpo(
    cfg: fdl.Config,
    train: str,
    eval: str | None = None,
    eval_fraction: float = 0.01,
    rewards: tuple[str, ...] = ("exact_match",),
    **settings,
) -> None:
    """GRPO on the prompts of the JSON Lines files matching `train`: one a line, {"prompt": text or
    messages, ...fields the rewards read, e.g. "answer"}; evaluate (mean reward) on `eval`, or on a
    held-out eval_fraction. `rewards` names built-in reward functions of nnxlm.rewards (a recipe
    file can set objective.rewards to its own functions); settings are GRPO's (group_size, beta, ...)."""
    from nnxlm import rewards as builtin

    unknown = [name for name in rewards if name not in builtin.BUILTIN]
    if unknown:
        raise UserError(
            f"fiddler:grpo: unknown reward {', '.join(map(repr, unknown))}: use {', '.join(builtin.BUILTIN)}, or "
            "your own functions in a recipe file (objective.rewards)"
        )
    _files(cfg, JsonlFiles, train, eval, eval_fraction, field=None)
    cfg.objective = fdl.Config(GRPO, rewards=[builtin.BUILTIN[name] for name in rewards], **settings)


def lora(
    cfg: fdl.Config,
    rank: int = 16,
    alpha: float = 32.0,
    targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down"),
    dropout: float = 0.0,
    rslora: bool = False,
) -> None:
    """LoRA adapters on the model's projections (nnxlm.modules.lora), which alone train: targets
    q, k, v, o, gate, up, down, q_a, q_b, kv_a, kv_b, head; scale alpha / rank."""
    cfg.model.lora = fdl.Config(LoRA, rank=rank, alpha=alpha, targets=tuple(targets), dropout=dropout, rslora=rslora)
    cfg.trainable = "lora"


def quantize(
    cfg: fdl.Config,
    weights: str | None = "int8",
    activations: str | None = "int8",
    block_size: int | None = None,
    embed: bool = False,
    head: bool = False,
    kv: str | None = None,
) -> None:
    """int8 weights and / or KV cache (nnxlm.modules.quantization) for the model as it is built:
    with fiddler:lora, LoRA trains over the int8 base (QLoRA); `nnxlm quantize` does the same to a
    trained run directory."""
    cfg.model.quantization = fdl.Config(
        Quantization, weights=weights, activations=activations, block_size=block_size, embed=embed, head=head, kv=kv
    )


def prepared(cfg: fdl.Config, path: str) -> None:
    """Train on the token ids `nnxlm data prepare` wrote to the directory `path` (its train split);
    evaluate on its eval split, or not at all when it has none. The run uses the tokenizer saved
    there unless the recipe sets tokenizer_path or starts from a model (each has its own: a
    different one is refused when the data loads)."""
    from nnxlm.data.prepared import Prepared, read_manifest

    manifest = read_manifest(path)  # a wrong path fails here, before anything is built
    cfg.train_data = fdl.Config(Prepared, path=path, split="train")
    cfg.eval_data = fdl.Config(Prepared, path=path, split="eval") if "eval" in manifest["splits"] else None
    file = manifest["tokenizer"]["file"]
    if file and not (cfg.tokenizer_path or cfg.load_parameters_path or cfg.load_full_state_path):
        cfg.tokenizer_path = str(epath.Path(path) / file)


_SOURCE_BY_SUFFIX = {".jsonl": JsonlFiles, ".parquet": ParquetFiles, ".array_record": ArrayRecordFiles}


def mixture(cfg: fdl.Config, weights: dict, field: str = "text", eval_fraction: float = 0.01) -> None:
    """Train on a weighted mixture of file globs, e.g. mixture({'data/code/*.jsonl': 0.7,
    'data/web/*.parquet': 0.3}): documents are drawn from each in proportion to its weight
    (nnxlm.data.Mixture); evaluate on the same mixture of held-out eval_fraction splits. Each glob's
    files are read by their suffix (.jsonl, .parquet, .array_record; text files otherwise, one
    document a file), `field` naming the text where records have fields; each source is named in
    the logs by the directory its glob starts in (data/code/*.jsonl -> code)."""
    from nnxlm.data import Mixture
    from nnxlm.data.sources import _glob_base

    if not isinstance(weights, dict) or not weights:
        raise UserError(f"mixture weights {weights!r}: give a dict of glob -> weight, e.g. {{'data/*.txt': 1.0}}")
    names = [epath.Path(_glob_base(str(glob))).name or "." for glob in weights]
    if len(set(names)) != len(names) or "." in names or ".." in names:
        names = [f"source{k}" for k in range(len(weights))]

    def sources(split: str) -> list:
        out = []
        for glob in weights:
            kind = next((c for suffix, c in _SOURCE_BY_SUFFIX.items() if str(glob).endswith(suffix)), TextFiles)
            fields = {} if kind is TextFiles else {"field": field}
            out.append(fdl.Config(kind, globs=[glob], split=split, eval_fraction=eval_fraction, **fields))
        return out

    values = list(weights.values())
    cfg.train_data = fdl.Config(Mixture, sources=sources("train"), weights=values, names=names)
    cfg.eval_data = fdl.Config(Mixture, sources=sources("eval"), weights=values, names=names)
