"""Multi-process training on localhost: two `nnxlm train` processes of one CPU device each."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from nnxlm.errors import UserError
from nnxlm.sharding import distributed
from tests import cpu_env

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = cpu_env(1)
RECIPE = ["--recipe", "tiny", "--recipe", "set:eval_every=3", "--recipe", "set:checkpoint_every=3"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def command(workdir, *extra):
    return [sys.executable, "-m", "nnxlm", "train", *RECIPE, "--workdir", str(workdir), *extra]


def start_two_processes(workdir, *recipe_changes, logs):
    port = free_port()
    processes = []
    for i in range(2):
        hosts = ["--coordinator", f"localhost:{port}", "--num_processes", "2", "--process_id", str(i)]
        log = open(logs / f"process{i}.log", "w")  # noqa: SIM115 (closed with the process)
        processes.append(
            subprocess.Popen(
                command(workdir, *recipe_changes, *hosts), cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT
            )
        )
    return processes


def losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return {r["step"]: (r["loss"], r.get("eval_loss")) for r in records}


def assert_close(a, b):
    for x, y in zip(a, b, strict=True):
        assert (x is None) == (y is None) and (x is None or abs(x - y) / abs(x) < 1e-5), (a, b)


def test_two_processes_train_like_one_and_either_count_resumes_the_other(tmp_path):
    processes = start_two_processes(tmp_path / "two", "--recipe", "set:num_steps=6", logs=tmp_path)
    for process in processes:
        assert process.wait(timeout=300) == 0, (tmp_path / "process0.log").read_text()[-3000:]
    # one process reading the same two data shards sees the same global batches
    one = subprocess.run(
        command(tmp_path / "one", "--recipe", "set:num_steps=6", "--recipe", "set:data_shards=2"),
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    two, single = losses(tmp_path / "two"), losses(tmp_path / "one")
    assert sorted(two) == sorted(single) == list(range(1, 7))
    for step in two:
        assert_close(two[step], single[step])
    # the two processes' step-3 checkpoint resumes in one process, data position included
    shutil.copytree(tmp_path / "two/checkpoints/3", tmp_path / "resumed/checkpoints/3")
    resumed = subprocess.run(
        command(tmp_path / "resumed", "--recipe", "set:num_steps=6", "--recipe", "set:data_shards=2"),
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    continued = losses(tmp_path / "resumed")
    assert sorted(continued) == [4, 5, 6]
    for step in continued:
        assert_close(continued[step], two[step])


def test_when_one_process_dies_the_other_exits_with_an_error_within_a_minute(tmp_path):
    changes = ["--recipe", "set:num_steps=100000", "--recipe", "set:checkpoint_every=0", "--recipe", "set:eval_every=0"]
    survivor, victim = start_two_processes(tmp_path / "run", *changes, logs=tmp_path)
    try:
        deadline = time.monotonic() + 240
        while "step     10" not in (tmp_path / "process0.log").read_text():
            assert survivor.poll() is None and time.monotonic() < deadline, "the run did not reach step 10"
            time.sleep(0.5)
        victim.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        code = survivor.wait(timeout=60)
        assert code != 0 and time.monotonic() - killed < 60
    finally:
        for process in (survivor, victim):
            if process.poll() is None:
                process.kill()


def test_process_flags_are_checked_before_anything_starts(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.initialize() is False  # no flags, no environment, no cluster: one process
    with pytest.raises(UserError, match="missing: num_processes, process_id"):
        distributed.initialize("localhost:1234")
    with pytest.raises(UserError, match=r"process_id 2 must be in \[0, num_processes=2\)"):
        distributed.initialize("localhost:1234", 2, 2)
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(UserError, match="num_processes is 'two'"):
        distributed.initialize("localhost:1234", None, 0)
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    with pytest.raises(UserError, match="must be HOST:PORT"):
        distributed.initialize("localhost", None, 0)


def test_a_mesh_that_splits_rows_across_processes_is_refused_with_one_line(tmp_path):
    env = cpu_env(2)
    port, processes = free_port(), []
    for i in range(2):
        hosts = ["--coordinator", f"localhost:{port}", "--num_processes", "2", "--process_id", str(i)]
        mesh = ["--recipe", 'set:mesh={"sequence": 4}']
        processes.append(
            subprocess.Popen(
                command(tmp_path, *mesh, *hosts),
                cwd=ROOT,
                env=env,
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        )
    for process in processes:
        _, err = process.communicate(timeout=120)
        assert process.returncode == 2, err[-2000:]
        assert "splits the sequence across processes" in err.splitlines()[-1]
