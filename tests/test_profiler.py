"""The Trainer's profile_steps / profile_skip_steps: a JAX profiler trace of exactly the steps asked,
in <workdir>/profile (local or in a bucket), each step marked; nothing without them."""

import gzip
import json
import os

import fiddle as fdl

import nnxlm
from nnxlm.cli import main
from nnxlm.metrics import measured_peak_flops
from nnxlm.profiling import StepProfiler


def tiny(workdir, **changes):
    """The tiny recipe without evaluation, checkpointed at the end only: a few quick steps."""
    cfg = nnxlm.recipes.tiny()
    cfg.workdir, cfg.num_steps, cfg.checkpoint_every = str(workdir), 4, 0
    cfg.eval_data, cfg.eval_every = None, 0
    cfg.optimizer.decay_steps = 4
    for name, value in changes.items():
        setattr(cfg, name, value)
    return cfg


def traces(profile_dir) -> dict[str, list[str]]:
    """{trace session directory: its file names} under profile_dir/plugins/profile."""
    sessions = profile_dir / "plugins" / "profile"
    return {session.name: sorted(f.name for f in session.iterdir()) for session in sessions.iterdir()}


def traced_steps(session_dir) -> list[int]:
    """The step numbers of the "train" step annotations in a session's Chrome trace."""
    (trace_file,) = session_dir.glob("*.trace.json.gz")
    events = json.loads(gzip.decompress(trace_file.read_bytes()))["traceEvents"]
    return sorted(int(e["args"]["step_num"]) for e in events if e.get("name") == "train" and e.get("ph") == "X")


def test_the_steps_asked_are_traced_into_the_run_directory_and_marked(tmp_path, capsys):
    peak = measured_peak_flops()
    history = fdl.build(tiny(tmp_path, profile_steps=2, profile_skip_steps=1)).fit()
    # stopping the trace waits for its last step: the steps' times still add up (a step timed short
    # would read as faster than the machine and raise its measured peak)
    assert measured_peak_flops() == peak and [r["step"] for r in history] == [1, 2, 3, 4]
    ((session, files),) = traces(tmp_path / "profile").items()
    assert "perfetto_trace.json.gz" in files, files
    assert any(f.endswith(".xplane.pb") for f in files) and any(f.endswith(".trace.json.gz") for f in files), files
    assert traced_steps(tmp_path / "profile" / "plugins" / "profile" / session) == [2, 3]  # step 1 compiles
    assert f"profile of step 2-3 written to {tmp_path / 'profile'}" in capsys.readouterr().err


def test_no_trace_without_profile_steps_and_a_resumed_run_skips_from_where_it_starts(tmp_path):
    fdl.build(tiny(tmp_path, num_steps=2)).fit()  # profile_steps defaults to 0
    assert not (tmp_path / "profile").exists()
    fdl.build(tiny(tmp_path, profile_steps=1, profile_skip_steps=1)).fit()  # resumes at step 2 (a changed field)
    ((session, _),) = traces(tmp_path / "profile").items()
    assert traced_steps(tmp_path / "profile" / "plugins" / "profile" / session) == [4]


def test_a_run_in_a_bucket_gets_its_trace_copied_there(fake_gcs):
    fdl.build(tiny("gs://bucket/run", num_steps=2, profile_steps=1)).fit()
    stored = fake_gcs / "bucket" / "run" / "profile"
    ((session, files),) = traces(stored).items()
    assert "perfetto_trace.json.gz" in files and any(f.endswith(".xplane.pb") for f in files), files
    assert traced_steps(stored / "plugins" / "profile" / session) == [2]
    assert os.listdir(".") == []  # nothing written beside the working directory (./gs:/...)


def test_a_run_that_ends_before_the_traced_steps_says_so(tmp_path, capsys):
    profiler = StepProfiler(tmp_path, start_step=0, skip_steps=5, steps=2)
    for step in (1, 2):
        with profiler.step(step):
            pass
        assert not profiler.ends_at(step)
    profiler.close(2)
    assert "no step profiled: the run ended at step 2, before step 6" in capsys.readouterr().err
    assert not (tmp_path / "profile").exists()


def test_a_bad_profile_value_is_one_line_naming_the_field(tmp_path, capsys):
    for field, value, fix in (
        ("profile_steps", "-1", "use a whole number of at least 0"),
        ("profile_skip_steps", "1.5", "use a whole number of at least 0"),
    ):
        code = main(["train", "--recipe", "tiny", "--recipe", f"set:{field}={value}", "--workdir", str(tmp_path)])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1, err
        assert f"recipe field {field} is {value}: {fix}" in err, err
    assert os.listdir(tmp_path) == []
