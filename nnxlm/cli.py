"""The `nnxlm` command line: train, inspect, data show / prepare, tokenizer train, decode, serve, chat, quantize,
convert.

Recipes are chosen and edited with repeated --recipe directives (see nnxlm.recipes.directives).
Any mistake in the user's input prints one line and exits with code 2.
"""

import argparse
import os
import signal
import sys

from nnxlm.errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + message
        raise UserError(f"{message} (see {self.prog} --help)")


def _trust_argument(parser):
    parser.add_argument(
        "--trust_recipe_code",
        action="store_true",
        help="let recipe JSON (a .json --recipe, a run directory's saved recipe) name code outside nnxlm, "
        "which may run it: only for recipes whose source you trust",
    )


def _recipe_argument(parser):
    parser.add_argument(
        "--recipe",
        action="append",
        required=True,
        help="NAME | path/to/file.py[:fn], then any number of fiddler:NAME(args) and set:a.b=VALUE, in order",
    )


def _serving_arguments(parser):
    _trust_argument(parser)
    parser.add_argument("--checkpoint", required=True, help="run directory or checkpoint directory")
    parser.add_argument("--slots", type=int, default=16, help="requests decoded together (continuous batching)")
    parser.add_argument(
        "--max_length",
        type=int,
        help="tokens of prompt and completion (default: the recipe's seq_len; a converted model's context, "
        "up to 4096 tokens)",
    )
    parser.add_argument("--steps", type=int, default=8, help="decode steps on the device per host round trip")
    parser.add_argument("--tensor_parallel", type=int, default=1, help="devices of this host to shard the model over")
    parser.add_argument("--chat_template", help="a Jinja chat template file (default: the tokenizer's own)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="nnxlm", description="Train, inspect and run decoder-only language models.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = commands.add_parser("train", help="train a recipe (resumes from the run directory)")
    _trust_argument(train)
    _recipe_argument(train)
    train.add_argument("--workdir", help="run directory (default: runs/<recipe name>)")
    train.add_argument(
        "--resume_step",
        type=int,
        help="resume from this checkpoint instead of the newest (e.g. a damaged one); newer ones are set aside",
    )
    hosts = train.add_argument_group("multi-process runs (every process runs the same command)")
    hosts.add_argument("--coordinator", help="HOST:PORT of process 0 (or JAX_COORDINATOR_ADDRESS)")
    hosts.add_argument("--num_processes", type=int, help="processes in the run (or JAX_NUM_PROCESSES)")
    hosts.add_argument("--process_id", type=int, help="this process, 0 to num_processes - 1 (or JAX_PROCESS_ID)")

    inspect = commands.add_parser("inspect", help="print the resolved recipe, parameters, FLOPs and memory")
    _trust_argument(inspect)
    _recipe_argument(inspect)
    inspect.add_argument("--compile", action="store_true", help="compile the train step for XLA's memory analysis")
    inspect.add_argument(
        "--devices", type=int, help="plan for this many devices (CPU: fake ones; default: the recipe's mesh)"
    )

    data = commands.add_parser("data", help="look at a recipe's data")
    data_commands = data.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    show = data_commands.add_parser("show", help="print the first examples as the train step sees them")
    _trust_argument(show)
    _recipe_argument(show)
    show.add_argument("--n", type=int, default=3, help="how many examples (default 3)")
    show.add_argument("--workdir", help="run directory (default: runs/<recipe name>)")
    data_bench = data_commands.add_parser("bench", help="time the input pipeline alone: batches/s and tokens/s")
    _trust_argument(data_bench)
    _recipe_argument(data_bench)
    data_bench.add_argument("--seconds", type=float, default=10.0, help="how long to iterate (default 10)")
    data_bench.add_argument("--workdir", help="run directory (default: runs/<recipe name>)")
    prepare = data_commands.add_parser("prepare", help="tokenize the recipe's data once into shards (resumable)")
    _trust_argument(prepare)
    _recipe_argument(prepare)
    prepare.add_argument("--output", required=True, help="directory to write (train from it: fiddler:prepared)")
    prepare.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: one a core)")
    prepare.add_argument(
        "--documents_per_shard", type=int, help="default: n / 64 within [100, 10000], or the directory's on resume"
    )
    prepare.add_argument("--workdir", help="run directory whose tokenizer to use (default: runs/<recipe name>)")

    tokenizer = commands.add_parser("tokenizer", help="tokenizer tools")
    tokenizer_commands = tokenizer.add_subparsers(dest="tokenizer_command", required=True, parser_class=_Parser)
    tokenizer_train = tokenizer_commands.add_parser("train", help="train a SentencePiece tokenizer")
    _trust_argument(tokenizer_train)
    source = tokenizer_train.add_mutually_exclusive_group(required=True)
    source.add_argument("--recipe", action="append", help="train on this recipe's train_data")
    source.add_argument("--data", action="append", help="text file glob (repeatable); *.jsonl reads the 'text' field")
    tokenizer_train.add_argument("--vocab_size", type=int, help="default: the recipe model's vocab_size")
    tokenizer_train.add_argument("--max_chars", type=int, default=20_000_000, help="characters to train on")
    tokenizer_train.add_argument("--output", required=True, help="path of the .model file to write")

    decode = commands.add_parser("decode", help="complete prompts with a trained model, streaming the text")
    _trust_argument(decode)
    decode.add_argument("--checkpoint", required=True, help="run directory or checkpoint directory")
    decode.add_argument("--prompt", action="append", help="a prompt (repeatable); none: read prompts from stdin")
    decode.add_argument("--max_new_tokens", type=int, default=100)
    decode.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    decode.add_argument("--top_k", type=int, help="sample among the k most likely tokens")
    decode.add_argument("--top_p", type=float, help="sample among the most likely tokens holding this mass")
    decode.add_argument("--seed", type=int, default=0)

    serve = commands.add_parser("serve", help="serve a trained model over an OpenAI-compatible HTTP API")
    _serving_arguments(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--model_name", help="the model's name in the API (default: the run directory's name)")
    serve.add_argument("--max_queue", type=int, default=64, help="choices (prompts x n) waiting for a slot before 429s")
    serve.add_argument(
        "--tool_parser",
        choices=("hermes", "llama3_json"),
        help="the format of the model's tool calls (default: the one its chat template shows)",
    )

    chat = commands.add_parser("chat", help="chat with a trained model in the terminal (its chat template)")
    _serving_arguments(chat)
    chat.add_argument("--system", help="a system message opening the conversation")
    chat.add_argument("--max_tokens", type=int, help="most tokens of a reply (default: the rest of the context)")
    chat.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    chat.add_argument("--top_p", type=float, default=1.0)
    chat.add_argument("--seed", type=int)

    quantize = commands.add_parser("quantize", help="a run directory -> a new one with int8 weights / KV cache")
    _trust_argument(quantize)
    quantize.add_argument("source", help="run directory or checkpoint directory (float)")
    quantize.add_argument("destination", help="new run directory")
    quantize.add_argument("--weights", choices=("int8", "none"), default="int8", help="weight form (default int8)")
    quantize.add_argument(
        "--activations",
        choices=("int8", "none"),
        default="int8",
        help="int8: int8 x int8 matmuls with inputs quantized on the fly (default); none: weight-only",
    )
    quantize.add_argument("--block_size", type=int, help="inputs per weight scale (default: one a channel)")
    quantize.add_argument("--kv", choices=("int8", "none"), default="none", help="KV cache form (default: float)")
    quantize.add_argument("--embed", action="store_true", help="also quantize the embedding table")
    quantize.add_argument("--head", action="store_true", help="also quantize the output head")

    convert = commands.add_parser("convert", help="Hugging Face checkpoints in and out")
    directions = convert.add_subparsers(dest="direction", required=True, parser_class=_Parser)
    from_hf = directions.add_parser("from-hf", help="an HF model directory -> an nnxlm run directory")
    from_hf.add_argument("source", help="directory with config.json and safetensors (and a tokenizer)")
    from_hf.add_argument("destination", help="new run directory (checkpoint, recipe, tokenizer)")
    from_hf.add_argument("--base", help="the base model's HF directory, when source is a peft LoRA adapter")
    to_hf = directions.add_parser("to-hf", help="an nnxlm run directory or checkpoint -> an HF model directory")
    _trust_argument(to_hf)
    to_hf.add_argument("source", help="run directory or checkpoint directory")
    to_hf.add_argument("destination", help="directory for config.json and safetensors")
    lora = to_hf.add_mutually_exclusive_group()
    lora.add_argument("--adapter", action="store_true", help="write the LoRA adapters as a peft adapter")
    lora.add_argument("--merged", action="store_true", help="write the model with its LoRA adapters merged")
    to_hf.add_argument(
        "--dtype", help="the weights' dtype: float32, bfloat16 or float16 (default: as the run holds them)"
    )
    to_hf.add_argument("--base", help="with --adapter: the base model (HF directory or hub name) the adapter goes on")
    return parser


# What to lower when a command runs out of device memory.
OUT_OF_MEMORY_FIX = {
    "serve": "lower --slots or --max_length, or raise --tensor_parallel",
    "chat": "lower --slots or --max_length, or raise --tensor_parallel",
    "decode": "shorten the prompt or --max_new_tokens, or quantize the model (nnxlm quantize)",
}
TRAINING_MEMORY_FIX = (
    "lower batch_size or seq_len, raise grad_accum_steps, set model.remat_policy='full', or shard the model "
    "over more devices"
)


def main(argv=None) -> int:
    args = None
    try:
        args = build_parser().parse_args(argv)
        from nnxlm.recipes.serialization import trust_recipe_code

        with trust_recipe_code(getattr(args, "trust_recipe_code", False)):  # restored after: main may run again
            return COMMANDS[args.command](args)
    except UserError as e:  # one line: fiddle appends its build context on lines of its own
        print(f"nnxlm: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        if not _output_closed():
            raise  # another pipe (a data worker's): its traceback
        # the reader of the output left (nnxlm inspect | head): nothing more to say, and no second
        # error when Python flushes stdout at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as e:
        if type(e).__name__ != "JaxRuntimeError" or "RESOURCE_EXHAUSTED" not in str(e):
            raise
        fix = OUT_OF_MEMORY_FIX.get(getattr(args, "command", None), TRAINING_MEMORY_FIX)
        print(f"nnxlm: error: the device ran out of memory ({str(e).splitlines()[0]}): {fix}", file=sys.stderr)
        return 2


def _output_closed() -> bool:
    """Whether standard output is a pipe whose reader has gone."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows), or stdout not a file
        return False


def train(args) -> int:
    import fiddle as fdl

    from nnxlm.recipes.directives import resolve
    from nnxlm.sharding.distributed import initialize

    initialize(args.coordinator, args.num_processes, args.process_id)  # before anything touches a device
    cfg = resolve(args.recipe)
    if args.workdir:
        cfg.workdir = args.workdir
    trainer = fdl.build(cfg)
    _make_run_directory(trainer.workdir)
    _cache_compilations(f"{trainer.workdir}/jax_cache")
    trainer.fit(resume_step=args.resume_step)
    if trainer.stopped_by:  # SIGTERM or Ctrl-C: the checkpoint is written, the run is not done
        return 128 + signal.Signals[trainer.stopped_by].value
    return 0


def _make_run_directory(workdir: str) -> None:
    """The run directory, made now: one that cannot be is one line, before any compiling."""
    from etils import epath

    path = epath.Path(workdir)
    try:
        if path.exists() and not path.is_dir():
            raise UserError(f"the run directory {workdir} is a file: give a directory with --workdir")
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(
            f"cannot make the run directory {workdir} ({e.strerror or e}): give --workdir a writable path"
        ) from None


def _cache_compilations(directory: str) -> None:
    """Keeps XLA's compiled programs in the run directory, so that a restarted run (resuming after
    a stop) loads its train step instead of compiling it again: bench_llama_20m relaunches in about
    half the time. A cache the user set (JAX_COMPILATION_CACHE_DIR) wins. JAX opens its cache once
    a process, so the path is absolute: it must stay valid if the working directory changes. JAX
    reads and writes a gs:// (or other epath) cache through epath too."""
    import jax

    from nnxlm.files import absolute

    if not jax.config.jax_compilation_cache_dir:  # JAX makes the directory when it first writes to it
        jax.config.update("jax_compilation_cache_dir", str(absolute(directory)))


def inspect(args) -> int:
    import math

    from nnxlm.recipes.directives import resolve
    from nnxlm.report import describe
    from nnxlm.sharding.memory import use_fake_cpu_devices

    cfg = resolve(args.recipe)
    sizes = dict(cfg.mesh or {})
    fixed = -1 not in sizes.values()
    if args.devices is not None and args.devices < 1:
        raise UserError(f"--devices is {args.devices}: give a positive device count")
    use_fake_cpu_devices(args.devices or (math.prod(sizes.values()) if fixed else 1))
    print(describe(cfg, compile_step=args.compile))
    return 0


def data(args) -> int:
    import fiddle as fdl

    from nnxlm.data.show import show
    from nnxlm.recipes.directives import resolve

    if args.data_command == "show" and args.n < 1:
        raise UserError(f"--n is {args.n}: give a positive number of examples")
    if args.data_command == "bench" and not args.seconds > 0:
        raise UserError(f"--seconds is {args.seconds}: give a positive time")
    cfg = resolve(args.recipe)
    if args.workdir:
        cfg.workdir = args.workdir
    trainer = fdl.build(cfg)
    if trainer.train_data is None:
        raise UserError("the recipe has no train_data: point it at data (e.g. fiddler:sft('data/*.jsonl'))")
    if args.data_command == "bench":
        from nnxlm.data.loader_bench import bench

        print(bench(trainer, args.seconds))
    elif args.data_command == "prepare":
        _prepare(trainer, args)
    else:
        print(show(trainer, args.n))
    return 0


def _prepare(trainer, args) -> None:
    """`nnxlm data prepare`: the recipe's train_data and eval_data, tokenized by the run's tokenizer."""
    from nnxlm.data.prepared import prepare
    from nnxlm.starting_points import find_run_tokenizer

    for name in ("workers", "documents_per_shard"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name} {getattr(args, name)} is not positive: give a positive number")
    trainer.plan()
    tokenizer = find_run_tokenizer(trainer)
    if tokenizer is None:
        raise UserError("the recipe's data is synthetic token ids, made as it trains: there is no text to prepare")
    if trainer.eval_data is not None:
        trainer.eval_data.documents()  # an eval split with no documents stops before train is written
    for split, source in (("train", trainer.train_data), ("eval", trainer.eval_data)):
        if source is not None:
            prepare(
                source, tokenizer, args.output, split=split, workers=args.workers,
                documents_per_shard=args.documents_per_shard,
            )  # fmt: skip
    print(f"wrote {args.output}: train from it with --recipe \"fiddler:prepared('{args.output}')\"")


def tokenizer(args) -> int:
    import fiddle as fdl
    from etils import epath

    from nnxlm.data import JsonlFiles, SentencePieceTokenizer, TextFiles
    from nnxlm.recipes.directives import resolve

    for name in ("max_chars", "vocab_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name} {getattr(args, name)} is not positive: give a positive number")
    if epath.Path(args.output).exists():  # perhaps the tokenizer a run was trained with, or the text itself
        raise UserError(f"--output {args.output} exists: give a new file name (nnxlm never writes over it)")
    if args.recipe:
        cfg = resolve(args.recipe)
        source = fdl.build(cfg.train_data)
        vocab_size = args.vocab_size or cfg.model.vocab_size
    else:
        jsonl = [g for g in args.data if g.endswith(".jsonl")]
        text = [g for g in args.data if not g.endswith(".jsonl")]
        if jsonl and text:
            raise UserError("--data mixes .jsonl and text globs: train on one kind at a time")
        source = JsonlFiles(globs=jsonl) if jsonl else TextFiles(globs=text)
        vocab_size = args.vocab_size
        if not vocab_size:
            raise UserError("--vocab_size is required with --data")
    texts = (source.load(doc) for doc in source.documents())
    model = SentencePieceTokenizer.train(texts, vocab_size, max_chars=args.max_chars)
    try:
        model.save(args.output)  # a local path or gs://...; the directory is made
    except OSError as e:
        raise UserError(f"cannot write --output {args.output} ({e.strerror or e}): give a writable path") from None
    print(f"wrote {args.output}: {model.vocab_size} tokens")
    if model.vocab_size < vocab_size:
        print(
            f"nnxlm: the text gave {model.vocab_size} of the {vocab_size} tokens asked (every merge it has): "
            "train on more text for a larger vocabulary",
            file=sys.stderr,
        )
    return 0


def decode(args) -> int:
    from nnxlm.generation import check_sampling

    try:
        check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    except ValueError as e:
        raise UserError(f"--{e}") from None
    prompts = [_utf8(prompt, "--prompt") for prompt in args.prompt or []]

    from etils import epath

    from nnxlm.checkpointing import find_checkpoint, load_model, load_recipe
    from nnxlm.data import find_tokenizer, load_tokenizer
    from nnxlm.generation import stream_text

    directory, _ = find_checkpoint(args.checkpoint)
    recipe = load_recipe(args.checkpoint)
    run_dir = epath.Path(directory).parent
    tokenizer_path = find_tokenizer(run_dir, recipe.tokenizer_path)
    if not epath.Path(tokenizer_path).exists():
        raise UserError(f"no tokenizer at {tokenizer_path}: decode needs the run's tokenizer.model or tokenizer.json")
    tokenizer = load_tokenizer(tokenizer_path)
    model = load_model(args.checkpoint)
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)

    def complete(prompt: str) -> None:
        if not prompt and tokenizer.bos_id is None:
            raise UserError("a prompt is empty and the tokenizer has no bos token to start from: give some text")
        sys.stdout.write(prompt)
        sys.stdout.flush()
        for piece in stream_text(model, tokenizer, prompt, args.max_new_tokens, **sampling):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()

    for prompt in prompts or _interactive_prompts():
        complete(prompt)
    return 0


def _utf8(text: str, where: str) -> str:
    """text, if it is valid UTF-8: bytes that are not arrive from the command line or a pipe as
    lone surrogates, which no tokenizer encodes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(f"{where} is not valid UTF-8 text (at character {e.start}): give UTF-8") from None
    return text


def _interactive_prompts(blank_ends: bool = True):
    """Lines typed at a `> ` prompt, until end of input, or a blank line when blank_ends (else
    blank lines are skipped)."""
    while True:
        if sys.stdin is None:  # started with stdin closed: nothing to read
            return
        try:
            line = input("> ")
        except EOFError:
            if sys.stdin.isatty():
                print()
            return
        except UnicodeDecodeError as e:
            raise UserError(f"the input is not valid UTF-8 text ({e.reason} at byte {e.start}): type UTF-8") from None
        line = _utf8(line, "the input")
        if line.strip():
            yield line
        elif blank_ends:
            return


def _engine(args, max_queue: int = 64):
    from nnxlm.serving import Engine
    from nnxlm.serving.load import load

    for name in ("slots", "steps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} {getattr(args, name)} is not positive: give a positive number")
    served = load(args.checkpoint, args.tensor_parallel, args.max_length, args.chat_template)
    engine = Engine(
        served.model,
        served.tokenizer,
        slots=args.slots,
        max_length=served.max_length,
        steps=args.steps,
        max_queue=max_queue,
        end_ids=served.end_ids,
        mesh=served.mesh,
    )
    del served.model  # the engine holds what it needs
    engine.warm_up()
    return engine, served


def serve(args) -> int:
    import uvicorn

    from nnxlm.serving.api import create_app

    if not 0 <= args.port < 65536 or args.max_queue < 0:
        raise UserError("--port must be 0 to 65535 and --max_queue at least 0")
    _check_address(args.host, args.port)
    engine, served = _engine(args, args.max_queue)
    name = args.model_name or served.name
    app = create_app(engine, name, served.template, args.tool_parser)
    print(
        f"nnxlm: serving {name} at http://{args.host}:{args.port}/v1 "
        f"({engine.num_slots} slots of {engine.max_length} tokens{_longer_context(served)}); "
        "Ctrl-C or SIGTERM drains and stops",
        file=sys.stderr,
        flush=True,
    )
    # uvicorn stops on SIGTERM / Ctrl-C once its open requests are answered, then hands the signal
    # to the handlers it found: these note it, so the engine drains and the command exits 0
    stops = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda number, _: stops.append(number))
    with engine:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=60)
    if stops:
        print(f"nnxlm: stopped by {signal.Signals(stops[0]).name} after answering every open request", file=sys.stderr)
    return 0


def _longer_context(served) -> str:
    """A note when the model's context is longer than a slot holds."""
    if served.context_length is None or served.context_length <= served.max_length:
        return ""
    return f"; the model's context is {served.context_length}: --max_length takes up to that"


def _more_context(served) -> str:
    if served.context_length is not None and served.context_length <= served.max_length:
        return "that is the model's whole context; start a new conversation"
    most = "" if served.context_length is None else f", up to the model's {served.context_length}"
    return f"start chat with a larger --max_length{most}"


def _check_address(host: str, port: int) -> None:
    """UserError when the server could not listen there (before minutes of loading a model)."""
    import socket

    try:
        with socket.create_server((host, port)):
            pass
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror}): choose another --port or --host") from None


def chat(args) -> int:
    from nnxlm.serving import Settings

    if args.max_tokens is not None and args.max_tokens < 1:
        raise UserError(f"--max_tokens {args.max_tokens} is not positive")
    if not 0.0 <= args.temperature or not 0.0 < args.top_p <= 1.0:
        raise UserError("--temperature must be >= 0 and --top_p in (0, 1]")
    engine, served = _engine(args)
    messages = [{"role": "system", "content": _utf8(args.system, "--system")}] if args.system else []
    print("nnxlm chat: type a message; Ctrl-D ends the conversation.", file=sys.stderr)
    with engine:
        for line in _interactive_prompts(blank_ends=False):
            messages.append({"role": "user", "content": line})
            text = served.template.render(messages, add_generation_prompt=True)
            ids = served.tokenizer.encode_with_offsets(text)[0]
            room = engine.max_length - len(ids)
            if room < 1:
                print(
                    f"nnxlm: the conversation fills the {engine.max_length}-token context: {_more_context(served)}",
                    file=sys.stderr,
                )
                return 0
            settings = Settings(
                max_tokens=min(args.max_tokens or room, room),
                temperature=args.temperature,
                top_p=args.top_p,
                seed=args.seed,
            )
            reply = []
            for update in engine.submit(ids, settings).updates():
                reply.append(update.text)
                sys.stdout.write(update.text)
                sys.stdout.flush()
            sys.stdout.write("\n")
            messages.append({"role": "assistant", "content": "".join(reply)})
    return 0


def quantize(args) -> int:
    from nnxlm.modules.quantization import Quantization
    from nnxlm.quantize import quantize_run

    def form(value):
        return None if value == "none" else value

    settings = Quantization(
        weights=form(args.weights),
        activations=form(args.activations),
        block_size=args.block_size,
        embed=args.embed,
        head=args.head,
        kv=form(args.kv),
    )
    quantize_run(args.source, args.destination, settings)
    print(f"wrote {args.destination}")
    return 0


def convert(args) -> int:
    from nnxlm.convert import from_hf, to_hf

    if args.direction == "from-hf":
        from_hf(args.source, args.destination, base=args.base)
    else:
        to_hf(args.source, args.destination, adapter=args.adapter, merged=args.merged, dtype=args.dtype, base=args.base)
    print(f"wrote {args.destination}")
    return 0


COMMANDS = {
    "train": train,
    "inspect": inspect,
    "data": data,
    "tokenizer": tokenizer,
    "decode": decode,
    "serve": serve,
    "chat": chat,
    "quantize": quantize,
    "convert": convert,
}
