"""`nnxlm serve` and `nnxlm chat` on a trained run directory; serving a tensor-parallel model."""

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import openai
import pytest

from tests import cpu_env
from tests.test_cli import run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_answers_the_openai_client_and_drains_on_sigterm(text_run):
    port = free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "-m", "nnxlm", "serve", "--checkpoint", text_run, "--port", str(port), "--slots", "4"]
    command += ["--max_length", "256"]  # (the recipe trained on 64-token rows)
    server = subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stderr.read()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.25)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["run"]
        chat = client.chat.completions.create(
            model="run", messages=[{"role": "user", "content": "def main():"}], max_tokens=8, temperature=0
        )
        assert chat.choices[0].finish_reason in ("stop", "length") and chat.usage.completion_tokens >= 1

        pieces, finishes = [], []
        stream = client.completions.create(
            model="run", prompt="import os\n", max_tokens=200, temperature=0, stream=True
        )
        first = next(iter(stream))
        server.send_signal(signal.SIGTERM)  # mid-stream: the open request finishes, then the server exits
        for chunk in [first, *stream]:
            pieces.append(chunk.choices[0].text)
            finishes.append(chunk.choices[0].finish_reason)
        assert finishes[-1] in ("stop", "length")
        assert server.wait(timeout=60) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    err = server.stderr.read()
    assert f"serving run at http://127.0.0.1:{port}/v1" in err and "Traceback" not in err


def test_chat_streams_replies_and_keeps_the_conversation(capsys, monkeypatch, text_run):
    from nnxlm.serving import Engine

    prompts = []
    submit = Engine.submit

    def spy(self, prompt_ids, settings, notify=None):
        prompts.append(list(prompt_ids))
        return submit(self, prompt_ids, settings, notify)

    monkeypatch.setattr(Engine, "submit", spy)
    monkeypatch.setattr("sys.stdin", io.StringIO("def add(a, b):\n\nclass A:\n"))
    code, out, err = run_cli(
        capsys, "chat", "--checkpoint", text_run, "--max_tokens", "6", "--slots", "2", "--max_length", "256"
    )
    assert code == 0, err
    assert len(prompts) == 2  # two turns (the blank line is skipped)
    assert prompts[1][: len(prompts[0])] == prompts[0]  # the second turn continues the first conversation
    assert out.count("> ") == 4  # three lines read, then the end of input


def test_chat_says_when_the_conversation_fills_the_context(capsys, monkeypatch, text_run):
    monkeypatch.setattr("sys.stdin", io.StringIO("def add(a, b): return a + b " * 16 + "\n"))
    code, _, err = run_cli(capsys, "chat", "--checkpoint", text_run, "--slots", "1", "--max_length", "64")
    assert code == 0 and "the conversation fills the 64-token context: start chat with a larger --max_length" in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--slots", "0"], "--slots 0 is not positive"),
        (["--tensor_parallel", "3"], "--tensor_parallel 3: this host has 1 devices"),
        (["--max_length", "1"], "--max_length 1"),
        (["--port", "70000"], "--port must be"),
    ],
)
def test_bad_serve_arguments_are_one_line(capsys, text_run, args, message):
    code, _, err = run_cli(capsys, "serve", "--checkpoint", text_run, *args)
    assert code == 2 and message in err and err.count("\n") == 1, err


def test_a_port_in_use_is_one_line(capsys, text_run):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        code, _, err = run_cli(capsys, "serve", "--checkpoint", text_run, "--port", str(port))
    assert code == 2 and f"cannot listen on 127.0.0.1:{port}" in err and err.count("\n") == 1, err


def test_serve_of_a_missing_run_is_one_line(capsys, tmp_path):
    code, _, err = run_cli(capsys, "serve", "--checkpoint", str(tmp_path / "nope"))
    assert code == 2 and err.startswith("nnxlm: error:") and err.count("\n") == 1, err


def test_a_tensor_parallel_engine_gives_the_unsharded_greedy_tokens_in_float_and_int8():
    result = subprocess.run(
        [sys.executable, "-m", "tests.serving.tensor_parallel"],
        cwd=ROOT,
        env=cpu_env(2),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.split("RESULT ")[-1])
    for form in ("float", "int8"):
        assert out[form]["equal"] and "tensor" in out[form]["cache_spec"] and out[form]["kernel_devices"] == 2, out
    assert out["int8"]["kernel_dtype"] == out["int8"]["cache_dtype"] == "int8"
