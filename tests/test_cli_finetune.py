"""The fine-tuning command line: data show, inspect of a LoRA recipe, and each new bad input as one
line with exit code 2 that names the file and line where there is one."""

import json

import fiddle as fdl
import pytest
from flax import nnx

from nnxlm.cli import main
from nnxlm.convert import to_hf
from nnxlm.recipes import models

GOOD = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def sft_base(in_tmp, small_tokenizer):
    """A recipe file of a small model whose run directory holds the test tokenizer, and a data file."""
    (in_tmp / "runs" / "chat").mkdir(parents=True)
    small_tokenizer.save(str(in_tmp / "runs" / "chat" / "tokenizer.model"))
    (in_tmp / "chat.py").write_text(
        "from nnxlm.recipes import models, trainer\n\n"
        "def chat():\n"
        "    return trainer(models.llama_tiny(vocab_size=1000), seq_len=64, batch_size=2, num_steps=2)\n"
    )
    return in_tmp


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def test_data_show_marks_the_tokens_that_carry_loss(capsys, sft_base):
    write_jsonl(sft_base / "chat.jsonl", [GOOD] * 4)
    code, out, err = run_cli(capsys, "data", "show", "--recipe", "chat.py", "--recipe", "fiddler:sft('chat.jsonl')")
    assert code == 0, err
    assert "SFT data, seq_len 64" in out and out.count("--- example") == 3
    assert "<|user|>\nHi?\n<|assistant|>\n\u27e6Hello.</s>\u27e7" in out  # the answer and its eos carry the loss
    assert "examples" in out and "truncated" in out
    code, out, _ = run_cli(capsys, "data", "show", "--recipe", "tiny", "--n", "1")  # pretraining data too
    assert code == 0 and "NextToken data" in out and out.count("--- example") == 1


def test_inspect_shows_the_objective_and_what_trains(capsys, sft_base):
    write_jsonl(sft_base / "chat.jsonl", [GOOD])
    args = ["--recipe", "chat.py", "--recipe", "fiddler:sft('chat.jsonl')", "--recipe", "fiddler:lora(rank=4)"]
    code, out, err = run_cli(capsys, "inspect", *args)
    assert code == 0, err
    assert "objective.loss_on = 'assistant'" in out and "model.lora.rank = 4" in out
    trainable = next(line for line in out.splitlines() if line.startswith("trainable:"))
    # 4 layers x (64 x 4 + 4 x (64 + 32 + 32 + 64 + ...)) adapters: a small share, the rest frozen
    assert "trainable='lora'" in trainable and "freezing the rest saves" in trainable
    assert float(trainable.split("(")[1].split("%")[0]) < 20


@pytest.mark.parametrize(
    "lines, message",
    [
        (
            [GOOD, {"messages": [{"role": "user"}]}],
            "chat.jsonl:2: message 0 has no content: give a string",
        ),
        ([{"messages": [{"role": "robot", "content": "beep"}]}], "chat.jsonl:1: message 0 has unknown role 'robot'"),
        ([GOOD, GOOD, "{not json"], "chat.jsonl:3 is not valid JSON"),
        ([{"text": "pretraining text"}], "chat.jsonl:1: an SFT example needs 'messages', or 'prompt' and 'completion'"),
    ],
)
def test_bad_examples_are_one_line_naming_file_and_line(capsys, sft_base, lines, message):
    write_jsonl(sft_base / "chat.jsonl", lines)
    code, _, err = run_cli(capsys, "train", "--recipe", "chat.py", "--recipe", "fiddler:sft('chat.jsonl')")
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err, err


def test_bad_fine_tuning_settings_are_one_line(capsys, sft_base):
    write_jsonl(sft_base / "chat.jsonl", [GOOD])
    (sft_base / "broken.jinja").write_text("{% for message in messages %}{{ message['content'] }}")
    base = ["train", "--recipe", "chat.py", "--recipe", "fiddler:sft('chat.jsonl')"]
    cases = [
        (["--recipe", "fiddler:sft('chat.jsonl', chat_template='broken.jinja')"], "the chat template does not parse"),
        (["--recipe", "fiddler:lora(rank=0)"], "LoRA rank is 0: use a positive integer"),
        (["--recipe", "fiddler:lora(targets=('kv_b',))"], "LoRA targets ['kv_b'] match no projection"),
        (["--recipe", "set:trainable='lora'"], "trains no parameter"),
        (["--recipe", "set:objective.loss_on='prompt'"], "SFT loss_on is 'prompt'"),
        (["--recipe", "set:load_parameters_path='no/such/run'"], "no checkpoint found at"),
    ]
    for extra, message in cases:
        code, _, err = run_cli(capsys, *base, *extra)
        assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err, (extra, err)


def test_a_converted_model_needs_data_and_its_own_tokenizer(capsys, in_tmp):
    model = fdl.build(models.llama_tiny(vocab_size=1000))(rngs=nnx.Rngs(0))
    to_hf(model, str(in_tmp / "hf"))  # weights and config, no tokenizer
    assert run_cli(capsys, "convert", "from-hf", in_tmp / "hf", in_tmp / "run")[0] == 0
    code, _, err = run_cli(capsys, "train", "--recipe", in_tmp / "run" / "recipe.json", "--workdir", in_tmp / "run")
    assert code == 2 and "has no train_data" in err and "fiddler:text_files" in err
    write_jsonl(in_tmp / "chat.jsonl", [GOOD])
    args = ["--recipe", in_tmp / "run" / "recipe.json", "--recipe", "fiddler:sft('chat.jsonl')"]
    code, _, err = run_cli(capsys, "train", *args, "--workdir", in_tmp / "run")
    assert code == 2 and "has no tokenizer" in err and "tokenizer.json or tokenizer.model" in err, err
    assert not (in_tmp / "run" / "tokenizer.model").exists()  # no new vocabulary was made for it


def test_data_show_of_grpo_prompts_shows_each_prompt_and_its_record(capsys, sft_base):
    write_jsonl(sft_base / "prompts.jsonl", [{"prompt": f"{a} + 1 =", "answer": str(a + 1)} for a in range(8)])
    grpo = "fiddler:grpo('prompts.jsonl', group_size=2, max_new_tokens=8)"
    code, out, err = run_cli(capsys, "data", "show", "--recipe", "chat.py", "--recipe", grpo, "--n", "2")
    assert code == 0, err
    assert "GRPO data, seq_len 64" in out and out.count("--- prompt") == 2
    assert '"answer": "' in out and " + 1 =" in out and "examples" in out
