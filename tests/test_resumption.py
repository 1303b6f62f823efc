import hashlib
import json
import os
import re
import shutil

import fiddle as fdl
import jax
import numpy as np
import pytest
from flax import nnx

import nnxlm
from nnxlm.cli import main
from nnxlm.metrics import read_metrics
from nnxlm.resumption import checkpoint_damage, recipe_changes


def tiny(workdir, **changes):
    cfg = nnxlm.recipes.tiny()
    cfg.workdir = str(workdir)
    cfg.eval_every = 0
    cfg.checkpoint_every = 5
    cfg.keep_checkpoints = 10
    for name, value in changes.items():
        setattr(cfg, name, value)
    return cfg


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 20-step run with checkpoints at steps 5, 10, 15 and 20, and a 25-step reference run."""
    root = tmp_path_factory.mktemp("runs")
    fdl.build(tiny(root / "run", num_steps=20, optimizer=_optimizer())).fit()
    reference = fdl.build(tiny(root / "reference", num_steps=25, optimizer=_optimizer())).fit()
    return root / "run", {r["step"]: r["loss"] for r in reference}


def _optimizer():
    cfg = nnxlm.recipes.tiny().optimizer
    cfg.decay_steps = 25  # the same schedule for a 20-step run and its 25-step continuation
    return cfg


def _tree_digest(directory) -> dict[str, str]:
    return {
        os.path.relpath(os.path.join(root, name), directory): hashlib.sha256(
            open(os.path.join(root, name), "rb").read()
        ).hexdigest()
        for root, _, names in os.walk(directory)
        for name in names
    }


def _damage(step_dir, how: str) -> None:
    if how == "missing metadata":
        os.remove(step_dir / "state" / "_METADATA")
    elif how == "unreadable recipe":
        (step_dir / "recipe" / "metadata").write_text("{not json")
    elif how in ("info without train_state", "a malformed checksum"):
        info = json.loads((step_dir / "info" / "metadata").read_text())
        if how == "info without train_state":
            del info["train_state"]
        else:
            info["checksums"]["model/head"] = "zzz"
        (step_dir / "info" / "metadata").write_text(json.dumps(info))
    elif how == "truncated arrays":  # found only when the arrays are read
        for root, _, names in os.walk(step_dir / "state"):
            for name in names:
                if os.sep + "d" in root:
                    path = os.path.join(root, name)
                    with open(path, "rb+") as f:
                        f.truncate(os.path.getsize(path) // 2)


@pytest.mark.parametrize(
    "how",
    ["missing metadata", "unreadable recipe", "truncated arrays", "info without train_state", "a malformed checksum"],
)
def test_a_damaged_newest_checkpoint_is_refused_left_alone_and_resumable_from_an_earlier_one(tmp_path, trained, how):
    source, reference = trained
    run = tmp_path / "run"
    shutil.copytree(source, run)
    _damage(run / "checkpoints" / "20", how)
    before = _tree_digest(run / "checkpoints")
    cfg = tiny(run, num_steps=25, optimizer=_optimizer())
    with pytest.raises(nnxlm.UserError, match=r"checkpoints/20 is damaged .*--resume_step 15"):
        fdl.build(cfg).fit()
    with pytest.raises(nnxlm.UserError, match=r"checkpoints/20 is damaged .*load the newest intact one, .*/15"):
        nnxlm.load_model(str(run))
    assert _tree_digest(run / "checkpoints") == before  # nothing written, moved or deleted

    later = fdl.build(cfg).fit(resume_step=15)
    assert [r["step"] for r in later] == list(range(16, 26))
    assert [r["loss"] for r in later] == [reference[s] for s in range(16, 26)]
    assert _tree_digest(run / "set_aside" / "20") == {
        os.path.relpath(p, "20"): d for p, d in before.items() if p.startswith("20" + os.sep)
    }  # the damaged step, moved aside untouched


def test_the_command_line_names_the_step_to_resume_from_in_one_line(tmp_path, trained, capsys):
    source, _ = trained
    shutil.copytree(source, tmp_path / "run")
    _damage(tmp_path / "run" / "checkpoints" / "20", "missing metadata")
    argv = ["--recipe", "tiny", "--recipe", "set:eval_every=0", "--workdir", str(tmp_path / "run")]
    assert main(["train", *argv]) == 2
    assert main(["decode", "--checkpoint", str(tmp_path / "run"), "--prompt", "x"]) == 2
    assert main(["train", *argv, "--resume_step", "7"]) == 2
    assert main(["convert", "to-hf", str(tmp_path / "run"), str(tmp_path / "hf")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("nnxlm: error: ") for line in lines)
    assert lines[3] == lines[1] and not (tmp_path / "hf").exists()
    assert "damaged (state/_METADATA is missing)" in lines[0] and "--resume_step 15" in lines[0]
    assert lines[1].endswith(f"load the newest intact one, {tmp_path / 'run' / 'checkpoints' / '15'}")
    assert "resume_step 7 is no checkpoint" in lines[2] and "5, 10, 15, 20" in lines[2]


def test_a_killed_save_never_looks_like_a_checkpoint(tmp_path, trained):
    source, _ = trained
    shutil.copytree(source, tmp_path / "run")
    checkpoints = tmp_path / "run" / "checkpoints"
    shutil.copytree(checkpoints / "20", checkpoints / "25.orbax-checkpoint-tmp-1234")  # as a kill leaves it
    assert nnxlm.checkpointing.find_checkpoint(str(tmp_path / "run")) == (str(checkpoints), 20)
    assert fdl.build(tiny(tmp_path / "run", num_steps=25, optimizer=_optimizer())).setup().step == 20
    assert checkpoint_damage(str(checkpoints), 20) is None


def test_resuming_with_a_changed_recipe_names_the_fields_and_refuses_unless_allowed(tmp_path, trained):
    source, _ = trained
    shutil.copytree(source, tmp_path / "run")
    changed = tiny(tmp_path / "run", num_steps=25, optimizer=_optimizer())
    changed.optimizer.learning_rate = 1e-3
    changed.model.d_model = 64  # the same value, set explicitly: not a change
    changed.model.block.mlp.hidden_dim = 96
    with pytest.raises(nnxlm.UserError) as refused:
        fdl.build(changed).setup()
    message = str(refused.value)
    assert "model.block.mlp.hidden_dim 192 -> 96" in message and "optimizer.learning_rate 0.003 -> 0.001" in message
    assert "model.d_model" not in message and "allow_recipe_change=True" in message
    allowed = tiny(tmp_path / "run", num_steps=25, optimizer=_optimizer(), allow_recipe_change=True)
    allowed.optimizer.learning_rate = 1e-3
    assert fdl.build(allowed).setup().step == 20
    # how long it runs, how it reports and how it is laid out may change freely
    relaid = tiny(tmp_path / "run", num_steps=40, optimizer=_optimizer(), log_every=1, eval_every=7)
    relaid.model.scan_layers = False
    relaid.mesh = {"data": 1}
    assert fdl.build(relaid).setup().step == 20


def test_resuming_on_another_data_layout_is_an_error_unless_the_data_order_may_restart(tmp_path, trained):
    source, _ = trained
    shutil.copytree(source, tmp_path / "run")
    with pytest.raises(nnxlm.UserError, match="data position of 1 data shards, this run reads 2: set data_shards=1"):
        fdl.build(tiny(tmp_path / "run", num_steps=25, data_shards=2, optimizer=_optimizer())).setup()
    restarted = fdl.build(
        tiny(tmp_path / "run", num_steps=25, data_shards=2, allow_data_restart=True, optimizer=_optimizer())
    )
    assert [r["step"] for r in restarted.fit()] == list(range(21, 26))
    # grain's iterator state depends on its worker processes too
    with pytest.raises(nnxlm.UserError, match="data position of num_workers=0, this run has 1: set num_workers=0"):
        fdl.build(tiny(tmp_path / "run", num_steps=30, data_shards=2, num_workers=1, optimizer=_optimizer())).setup()


def test_recipe_changes_reads_saved_recipes_without_importing_them(trained):
    source, _ = trained
    saved = nnxlm.checkpointing.Checkpointer(str(source / "checkpoints")).saved_recipe(20)
    tampered = {**saved, "objects": {**saved["objects"], "evil": {"type": {"type": "pyref", "module": "os"}}}}
    assert recipe_changes(saved, saved) == []
    assert recipe_changes(saved, tampered) == ["the recipe's classes or functions"]


def test_metrics_of_a_crash_mid_line_are_repaired_on_the_next_start(tmp_path):
    from nnxlm.metrics import MetricsWriter

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    assert read_metrics(str(tmp_path)) == [{"step": 1, "loss": 2.0}]
    writer = MetricsWriter(str(tmp_path))
    writer.write(2, {"loss": 1.5})
    writer.close()
    assert read_metrics(str(tmp_path)) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]


@pytest.mark.parametrize("where", [0.25, 0.5, 0.75])
def test_bytes_changed_on_disk_are_found_when_the_checkpoint_is_read(tmp_path, trained, where):
    """orbax keeps no checksums: bytes changed inside a compressed array file often decode without
    error into other numbers (finite or NaN, depending on where they fall, which varies with write
    order). nnxlm saves a checksum of each array and names the checkpoint as damaged, not trained
    on (a run had stopped a step later blaming the learning rate, and decode printed garbage)."""
    source, _ = trained
    shutil.copytree(source, tmp_path / "run")
    step_dir = tmp_path / "run" / "checkpoints" / "20"
    files = [os.path.join(d, f) for d, _, names in os.walk(step_dir / "state") for f in names]
    largest = max(files, key=os.path.getsize)  # the arrays' data
    with open(largest, "rb+") as f:
        f.seek(int(os.path.getsize(largest) * where))
        f.write(b"\xff" * 64)
    cfg = tiny(tmp_path / "run", num_steps=25, optimizer=_optimizer())
    damage = r"it cannot be restored: .*|.* does not match the checksum saved with it"
    with pytest.raises(nnxlm.UserError, match=rf"checkpoints/20 is damaged \(({damage})\).*resume from step 15"):
        fdl.build(cfg).fit()
    # the model alone (no optimizer state) is named as damaged or read as it was saved
    try:
        model = nnxlm.load_model(tmp_path / "run")
    except nnxlm.UserError as e:
        assert re.search(rf"checkpoints/20 is damaged \(({damage})\).*load the newest intact one, .*/15", str(e))
    else:
        as_saved = jax.tree.leaves(nnx.state(nnxlm.load_model(source)))
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(nnx.state(model)), as_saved, strict=True))


def test_a_longer_run_resumed_says_its_learning_rate_schedule_changes(tmp_path, capfd):
    """The learning rate decays over num_steps unless optimizer.decay_steps is set: resuming with
    another num_steps changes it from the next step on (a 6x drop in a user's run), which the run
    says, with the fix."""
    fdl.build(tiny(tmp_path / "run", num_steps=4)).fit()
    capfd.readouterr()
    later = fdl.build(tiny(tmp_path / "run", num_steps=8)).fit()
    message = capfd.readouterr().err
    assert "num_steps changed from 4 to 8 and the learning rate decays over num_steps: at step 4" in message
    assert "set optimizer.decay_steps=4 to keep the saved run's schedule" in message
    assert [r["step"] for r in later] == [5, 6, 7, 8]


def test_resume_step_in_a_run_directory_without_checkpoints_says_there_are_none(tmp_path):
    with pytest.raises(nnxlm.UserError, match=r"resume_step 5: .*checkpoints holds no checkpoint yet; leave"):
        fdl.build(tiny(tmp_path / "run", num_steps=10)).fit(resume_step=5)


def test_warmup_as_long_as_the_run_is_said(tmp_path, capfd):
    """A short fine-tune with the default warmup (longer than the run) peaks at its last step."""
    for num_steps in (4, 6):  # the tiny recipe warms up over 5 steps: 6 peaks at the last step too
        fdl.build(tiny(tmp_path / str(num_steps), num_steps=num_steps)).fit()
        said = f"optimizer.warmup_steps=5 reaches the last of the {num_steps} updates the learning rate decays over"
        assert said in capfd.readouterr().err
    fdl.build(tiny(tmp_path / "other", num_steps=8)).fit()
    assert "warmup_steps" not in capfd.readouterr().err
