import json
import os
import signal
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# When the interruptions of tests/interruptions.py strike, spread over a 150-step run that saves
# every 6 steps: 20 SIGKILLs (at steps, during asynchronous checkpoint writes, right after a
# checkpoint completes), two SIGTERMs, a Ctrl-C and a double SIGTERM.
POINTS = [
    "kill@3", "kill@write", "kill@saved", "kill@14", "kill@write", "term@22", "kill@25", "kill@saved",
    "kill@write", "int@40", "kill@43", "kill@write", "kill@saved", "kill@56", "term2@60", "kill@64",
    "kill@write", "kill@75", "kill@saved", "term@84", "kill@write", "kill@93", "kill@100", "kill@write",
]  # fmt: skip


def test_a_run_interrupted_at_24_points_ends_bit_identical_to_an_uninterrupted_one(tmp_path):
    assert sum(p.startswith("kill@") for p in POINTS) == 20
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        [sys.executable, os.path.join(REPO, "tests", "interruptions.py"), str(tmp_path), *POINTS],
        env=env, capture_output=True, text=True, cwd=REPO, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    expected_exit = {"kill": -signal.SIGKILL, "term": 143, "int": 130, "term2": 143}
    for interruption in report["interruptions"]:
        point = interruption["point"]
        assert interruption["reached"], f"{point}: the run ended before it could be interrupted"
        assert interruption["exitcode"] == expected_exit[point.split("@")[0]], interruption
        assert not interruption["damaged"], interruption  # no checkpoint was ever unreadable
        if point.startswith(("term@", "int@")):  # saved where it stopped, at or after the signal
            assert interruption["latest_checkpoint"] >= interruption["at_step"], interruption
    progress = [i["latest_checkpoint"] or 0 for i in report["interruptions"]]
    assert progress == sorted(progress) and progress[-1] >= 84  # the kills spread over the run
    assert report["final_exitcode"] == 0
    assert report["steps"] == 150 and report["differing_steps"] == []


def test_a_second_signal_exits_at_once():
    script = (
        "import os, signal, time\n"
        "from nnxlm.preemption import StopRequests\n"
        "with StopRequests() as stop:\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(0.1)\n"
        "    assert stop.signal == signal.SIGTERM\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(5)\n"
        "print('not reached')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 143 and "not reached" not in done.stdout
    assert "SIGTERM again: exiting now" in done.stderr


def test_outside_fit_the_signal_handlers_are_the_ones_before():
    from nnxlm.preemption import StopRequests

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with StopRequests():
        assert signal.getsignal(signal.SIGTERM) != before[0]
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
