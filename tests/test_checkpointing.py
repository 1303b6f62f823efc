import errno
import os
import subprocess
import sys

import fiddle as fdl
import jax.numpy as jnp
import numpy as np
import pytest
from orbax.checkpoint._src.path import atomicity

import nnxlm
from nnxlm.checkpointing import find_checkpoint


def _fail_at_step(monkeypatch, step: int, how: str) -> None:
    """Makes orbax's write of checkpoint `step` fail as a full disk or a denied permission does."""
    if how == "disk full at commit":
        rename = atomicity.async_path.rename

        async def failing_rename(source, target, *args, **kwargs):
            if os.path.basename(str(target)) == str(step):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))
            return await rename(source, target, *args, **kwargs)

        monkeypatch.setattr(atomicity.async_path, "rename", failing_rename)
    else:
        create = atomicity._create_tmp_directory

        async def failing_create(makedir, tmp_dir, *args, **kwargs):
            if os.path.basename(str(tmp_dir)).startswith(f"{step}."):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(tmp_dir))
            return await create(makedir, tmp_dir, *args, **kwargs)

        monkeypatch.setattr(atomicity, "_create_tmp_directory", failing_create)


@pytest.mark.parametrize("how", ["disk full at commit", "permission denied"])
def test_a_failed_checkpoint_write_is_one_line_and_leaves_the_earlier_ones_the_latest(tmp_path, monkeypatch, how):
    cfg = nnxlm.recipes.tiny()
    cfg.workdir, cfg.num_steps, cfg.checkpoint_every, cfg.eval_every = str(tmp_path), 15, 5, 0
    _fail_at_step(monkeypatch, 10, how)
    with pytest.raises(nnxlm.UserError) as failed:
        fdl.build(cfg).fit()
    message = str(failed.value)
    assert "\n" not in message and message.startswith(f"checkpoint step 10 could not be written to {tmp_path}")
    assert ("No space left on device" if how.startswith("disk") else "Permission denied") in message
    assert "the earlier checkpoints are intact (newest: 5)" in message
    monkeypatch.undo()
    assert find_checkpoint(str(tmp_path)) == (str(tmp_path / "checkpoints"), 5)
    resumed = fdl.build(cfg).setup()  # and what the failed write left is no checkpoint
    assert resumed.step == 5
    assert not [d for d in os.listdir(tmp_path / "checkpoints") if d.startswith("10")]


def test_a_run_whose_checkpoint_write_failed_exits_after_its_one_line(tmp_path):
    """orbax made a step's directory in the background, and when that failed its writer threads
    waited 300 s for it: the run printed its one-line error and could not exit for five minutes."""
    code = f"""
import fiddle as fdl, pytest, nnxlm
from tests.test_checkpointing import _fail_at_step
cfg = nnxlm.recipes.tiny()
cfg.workdir, cfg.num_steps, cfg.checkpoint_every, cfg.eval_every = {str(tmp_path)!r}, 15, 5, 0
_fail_at_step(pytest.MonkeyPatch(), 10, "permission denied")
try:
    fdl.build(cfg).fit()
except nnxlm.UserError as e:
    print(e)
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[-1].startswith(f"checkpoint step 10 could not be written to {tmp_path}")


def test_the_aftermath_of_a_failed_read_is_not_printed_around_its_one_line(monkeypatch):
    import sys
    import types

    from nnxlm import checkpointing

    passed_on = []
    monkeypatch.setattr(sys, "unraisablehook", passed_on.append)  # the hook before; restored after the test
    checkpointing._quiet_failed_reads()
    checkpointing._quiet_failed_reads()  # installed once

    def report(exc_value, obj=None):
        sys.unraisablehook(types.SimpleNamespace(exc_value=exc_value, object=obj))

    async def _read_array_index_and_device_put():  # orbax's pending reads, closed after the failure
        pass

    pending = _read_array_index_and_device_put()
    report(Exception("Encountered error while reading array index"), pending)
    pending.close()
    report(RuntimeError("Event loop is closed"))  # a tensorstore callback on orbax's closed loop
    assert passed_on == []
    report(ValueError("anything else"))
    assert [str(u.exc_value) for u in passed_on] == ["anything else"]


def test_an_array_that_reads_back_other_than_saved_is_named_by_every_reader(tmp_path):
    """Each checkpoint keeps its arrays' checksums in info/metadata: the model loader and the
    one-array reader (to-hf, quantize) name an array whose values differ from them, with the
    newest intact step, and read the others."""
    import json

    from nnxlm.checkpointing import ModelReader, saved_paths

    cfg = nnxlm.recipes.tiny()
    cfg.workdir, cfg.num_steps, cfg.checkpoint_every, cfg.eval_every = str(tmp_path), 4, 2, 0
    fdl.build(cfg).fit()
    info_file = tmp_path / "checkpoints" / "4" / "info" / "metadata"
    info = json.loads(info_file.read_text())
    assert set(info["checksums"]) == set(saved_paths(str(tmp_path / "checkpoints"), 4))  # every array
    value, dtype = info["checksums"]["model/head"].split(" ")
    info["checksums"]["model/head"] = f"{int(value, 16) ^ 1:016x} {dtype}"  # as if the array changed on disk
    info_file.write_text(json.dumps(info))
    damaged = rf"checkpoint {tmp_path}/checkpoints/4 is damaged \(model/head does not match the checksum saved"
    with pytest.raises(nnxlm.UserError, match=damaged + r".*load the newest intact one, .*checkpoints/2$"):
        nnxlm.load_model(tmp_path)
    with ModelReader(tmp_path) as reader:
        assert reader.read(("final_norm", "scale")).shape == (64,)
        with pytest.raises(nnxlm.UserError, match=damaged):
            reader.read(("head",))
    with pytest.raises(nnxlm.UserError, match=damaged + r".*resume from step 2"):
        cfg.num_steps = 6
        fdl.build(cfg).fit()

    # a fine-tune in bfloat16 reads the float32 arrays as saved, compares, then casts them
    tune = nnxlm.recipes.tiny()
    tune.workdir, tune.num_steps, tune.eval_every, tune.model.param_dtype = str(tmp_path / "tune"), 1, 0, "bfloat16"
    tune.load_parameters_path = str(tmp_path / "checkpoints" / "4")
    with pytest.raises(nnxlm.UserError, match=damaged):
        fdl.build(tune).setup()
    tune.load_parameters_path = str(tmp_path / "checkpoints" / "2")
    head = fdl.build(tune).setup().state["model"]["head"]["kernel"][...]
    assert head.dtype == jnp.bfloat16
    assert np.array_equal(head, nnxlm.load_model(tmp_path / "checkpoints" / "2").head.kernel[...].astype(jnp.bfloat16))
