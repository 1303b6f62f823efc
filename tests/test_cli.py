"""The command line: each user mistake gives one line naming it and the fix, exit code 2."""

import os
import subprocess
import sys

import pytest

from nnxlm.cli import main
from tests import cpu_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(capsys, *args):
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--recipe", "nope"], "unknown recipe 'nope'"),
        (["train", "--recipe", "tiny", "--recipe", "set:model.nm_layers=2"], "has no field 'nm_layers'"),
        (["train", "--recipe", "tiny", "--recipe", "set:optimizer.learning_rate='fast'"], "holds float"),
        (["inspect", "--recipe", "tiny", "--recipe", "set:model.dtype=bf16"], "not a Python literal"),
        (["train"], "--recipe"),
        (["fly"], "invalid choice"),
        (["decode", "--checkpoint", "/no/such/run", "--prompt", "x"], "no checkpoint found at /no/such/run"),
        (["decode", "--checkpoint", "r", "--max_new_tokens", "0"], "--max_new_tokens must be a positive integer"),
        (["decode", "--checkpoint", "r", "--temperature", "-1"], "--temperature must be >= 0"),
        (["decode", "--checkpoint", "r", "--temperature", "1", "--top_p", "1.5"], "--top_p must be in (0, 1]"),
        (["decode", "--checkpoint", "r", "--temperature", "1", "--top_k", "0"], "--top_k must be >= 1"),
        (["decode", "--checkpoint", "r", "--max_new_tokens", "many"], "invalid int value: 'many'"),
    ],
)
def test_user_errors_print_one_line_and_exit_2(capsys, in_tmp, args, message):
    code, out, err = run_cli(capsys, *args)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("nnxlm: error:") and message in err, err
    assert "Traceback" not in err


def test_missing_data_glob_is_a_one_line_error(capsys, in_tmp):
    recipe = in_tmp / "glob.py"
    recipe.write_text(
        "import fiddle as fdl, nnxlm\nfrom nnxlm.data import TextFiles\n\n"
        "def glob():\n    cfg = nnxlm.recipes.tiny()\n"
        "    cfg.train_data = fdl.Config(TextFiles, globs=['no/such/dir/*.txt'])\n    return cfg\n"
    )
    code, _, err = run_cli(capsys, "train", "--recipe", str(recipe))
    assert code == 2 and "no/such/dir/*.txt" in err and err.count("\n") == 1, err


def test_a_damaged_checkpoint_is_a_one_line_error_and_is_left_alone(capsys, in_tmp):
    assert run_cli(capsys, "train", "--recipe", "tiny", "--recipe", "set:num_steps=10", "--workdir", "run")[0] == 0
    step_dir = in_tmp / "run" / "checkpoints" / "10" / "state"
    damaged = [p for p in step_dir.rglob("*") if p.is_file() and p.stat().st_size > 0]
    for path in damaged:
        path.write_bytes(b"\0garbage")
    code, _, err = run_cli(capsys, "train", "--recipe", "tiny", "--recipe", "set:num_steps=20", "--workdir", "run")
    assert code == 2 and "checkpoint" in err and "10 is damaged" in err and err.count("\n") == 1, err
    assert all(path.read_bytes() == b"\0garbage" for path in damaged)  # nothing overwritten
    assert sorted(os.listdir(in_tmp / "run" / "checkpoints")) == ["10"]


def test_inspect_prints_the_resolved_recipe_and_counts(capsys):
    code, out, _ = run_cli(capsys, "inspect", "--recipe", "tiny", "--recipe", "set:model.num_layers=2")
    assert code == 0
    assert "model.num_layers = 2" in out and "parameters:" in out and "memory estimate" in out


def test_inspect_of_a_runs_recipe_json_lists_its_fields(capsys, tmp_path):
    """A recipe read from JSON has no history of where its values were set: its values alone."""
    import json

    import nnxlm
    from nnxlm.recipes.serialization import to_json

    (tmp_path / "recipe.json").write_text(json.dumps(to_json(nnxlm.recipes.tiny())))
    code, out, _ = run_cli(capsys, "inspect", "--recipe", str(tmp_path / "recipe.json"), "--recipe", "set:seq_len=32")
    assert code == 0 and "model.num_layers = 4\n" in out and "model.d_model = 64\n" in out
    assert "seq_len = 32 @ " in out and "<[unset" not in out  # an override, with where it was made


def test_inspect_counts_activations_of_one_micro_batch_under_gradient_accumulation(capsys):
    def activations(*settings):
        code, out, _ = run_cli(capsys, "inspect", "--recipe", "llama3_8b", *settings)
        assert code == 0
        line = next(line for line in out.splitlines() if line.strip().startswith("activations"))
        return float(line.split()[1]), float(line.split("logits ")[1].split()[0]), line

    whole, whole_logits, _ = activations()
    quarter, quarter_logits, line = activations("--recipe", "set:grad_accum_steps=4")
    assert quarter == pytest.approx(whole / 4, rel=0.01) and quarter_logits == pytest.approx(whole_logits / 4, rel=0.01)
    assert "one micro-batch of 4" in line


def test_python_dash_m_runs_the_same_command_line():
    result = subprocess.run(
        [sys.executable, "-m", "nnxlm", "inspect", "--recipe", "nope"], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 2 and "unknown recipe 'nope'" in result.stderr


def test_tokenizer_train_writes_a_model_from_text_files(capsys, in_tmp):
    (in_tmp / "a.txt").write_text("def add(a, b):\n    return a + b\n" * 200)
    code, out, _ = run_cli(
        capsys, "tokenizer", "train", "--data", str(in_tmp / "*.txt"), "--vocab_size", "300", "--output", "tok.model"
    )
    assert code == 0 and (in_tmp / "tok.model").exists()
    from nnxlm.data import SentencePieceTokenizer

    tokenizer = SentencePieceTokenizer.load(str(in_tmp / "tok.model"))
    assert tokenizer.decode(tokenizer.encode("def add(a, b):")) == "def add(a, b):"


def test_decode_streams_the_completion_of_each_prompt(capsys, text_run):
    import nnxlm
    from nnxlm.data import SentencePieceTokenizer

    prompts = ["def parse(", "import os\n"]
    args = [
        "decode",
        "--checkpoint",
        text_run,
        "--prompt",
        prompts[0],
        "--prompt",
        prompts[1],
        "--max_new_tokens",
        "20",
    ]
    sampling = ["--temperature", "0.8", "--top_p", "0.95", "--top_k", "50", "--seed", "1"]
    code, out, err = run_cli(capsys, *args, *sampling)
    assert code == 0, err
    model = nnxlm.load_model(text_run)
    tokenizer = SentencePieceTokenizer.load(os.path.join(text_run, "tokenizer.model"))
    expected = ""
    for prompt in prompts:  # the streamed text is what the one-call path returns
        (completion,) = nnxlm.generate_text(
            model, tokenizer, [prompt], 20, temperature=0.8, top_p=0.95, top_k=50, seed=1
        )
        assert completion
        expected += f"{prompt}{completion}\n"
    assert out == expected


def test_decode_without_prompts_reads_them_interactively(capsys, monkeypatch, text_run):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("def main(\n\nnot read\n"))
    code, out, err = run_cli(capsys, "decode", "--checkpoint", text_run, "--max_new_tokens", "8")
    assert code == 0, err
    assert out.startswith("> def main(") and out.endswith("\n> ") and out.count("> ") == 2 and "not read" not in out


def test_decode_of_a_run_without_its_tokenizer_is_a_one_line_error(capsys, tmp_path, text_run):
    import shutil

    shutil.copytree(text_run, tmp_path / "run")
    os.remove(tmp_path / "run" / "tokenizer.model")
    code, _, err = run_cli(capsys, "decode", "--checkpoint", str(tmp_path / "run"), "--prompt", "x")
    assert code == 2 and "no tokenizer at" in err and err.count("\n") == 1, err


def inspect_in_subprocess(*args, recipe="tiny"):
    """nnxlm inspect in a fresh process: it picks the CPU device count before JAX starts."""
    env = cpu_env()  # no inherited device count
    command = [sys.executable, "-m", "nnxlm", "inspect", "--recipe", recipe, *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def test_inspect_reports_per_device_memory_from_the_compiled_step_on_fake_devices():
    def temporaries(*mesh):
        out = inspect_in_subprocess(*mesh, "--compile")
        assert out.returncode == 0, out.stderr
        line = next(line for line in out.stdout.splitlines() if "compiled train step" in line)
        return out.stdout, float(line.split("temporaries ")[1].split(" MiB")[0])

    _, one = temporaries()
    eight_text, eight = temporaries("--recipe", 'set:mesh={"fsdp": 8}')
    assert "8 devices of cpu" in eight_text and "peak per device" in eight_text
    assert eight < one / 2  # activations split over the batch


# The published recipes at their published lengths (8192 and 4096 tokens) on plausible meshes, one
# row per device per micro-batch: the compiled step's peak fits an 80 GB accelerator.
PUBLISHED_MESHES = {
    "llama3_8b": ("8", "set:mesh={'fsdp': 8}", "set:grad_accum_steps=64"),
    "mixtral_8x7b": ("64", "set:mesh={'fsdp': 8, 'expert': 8}", "set:grad_accum_steps=16"),
}


@pytest.mark.parametrize("recipe", list(PUBLISHED_MESHES))
def test_published_recipes_fit_an_80_gb_accelerator_per_device(recipe):
    devices, mesh, accumulation = PUBLISHED_MESHES[recipe]
    out = inspect_in_subprocess(
        "--compile", "--devices", devices, "--recipe", mesh, "--recipe", accumulation, recipe=recipe
    )
    assert out.returncode == 0, out.stderr[-2000:]
    line = next(line for line in out.stdout.splitlines() if "peak per device" in line)
    assert f"{devices} devices of cpu" in out.stdout and float(line.split()[-2]) < 80 * 1e9 / 2**30, line


def test_inspect_rejects_a_device_count_below_one(capsys):
    code, _, err = run_cli(capsys, "inspect", "--recipe", "tiny", "--devices", "0")
    assert code == 2 and err.strip().count("\n") == 0 and "--devices is 0" in err


def test_running_out_of_device_memory_is_one_line_naming_what_to_lower(capsys, monkeypatch):
    import jax

    import nnxlm.cli

    def out_of_memory(args):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 698922861728 bytes.\nmore")

    monkeypatch.setitem(nnxlm.cli.COMMANDS, "inspect", out_of_memory)
    code, _, err = run_cli(capsys, "inspect", "--recipe", "tiny")
    assert code == 2 and err.count("\n") == 1 and "ran out of memory" in err and "lower batch_size or seq_len" in err
    monkeypatch.setitem(nnxlm.cli.COMMANDS, "serve", out_of_memory)  # what serving can lower
    code, _, err = run_cli(capsys, "serve", "--checkpoint", "run")
    assert code == 2 and err.count("\n") == 1 and "lower --slots or --max_length" in err


def test_a_broken_pipe_that_is_not_the_output_is_not_hidden(capsys, monkeypatch):
    import nnxlm.cli

    def worker_gone(args):
        raise BrokenPipeError("a data worker's pipe")

    monkeypatch.setitem(nnxlm.cli.COMMANDS, "inspect", worker_gone)
    with pytest.raises(BrokenPipeError):
        nnxlm.cli.main(["inspect", "--recipe", "tiny"])


def test_output_cut_short_by_its_reader_ends_without_a_traceback():
    """nnxlm inspect | head: the reader leaves before the output ends."""
    read, write = os.pipe()
    os.close(read)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "nnxlm", "inspect", "--recipe", "tiny"],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            timeout=120,
        )
    finally:
        os.close(write)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
