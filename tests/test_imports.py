"""Importing nnxlm changes nothing outside it, the command line alone restarts `nnxlm train` with
huge pages, and every module imports on its own, whatever was imported before it."""

import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from nnxlm import launch

ROOT = Path(__file__).resolve().parent.parent


def _python(code: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *(["-c", textwrap.dedent(code)] if code else []), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )


def _clean_environment(**extra) -> dict:
    """The environment with no huge-page setting of the user's, so that a restart would happen."""
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "NNXLM_HUGE_PAGES")}
    return {**env, "JAX_PLATFORMS": "cpu", **extra}


def test_importing_nnxlm_in_a_train_command_neither_restarts_nor_changes_the_environment():
    result = _python(
        """
        import os, sys
        print("started", flush=True)  # printed twice if the process re-executed itself
        sys.argv = ["/venv/bin/nnxlm", "train", "--recipe", "tiny"]  # what the restart looked for
        import jax
        environ, config, path = dict(os.environ), dict(jax.config.values), list(sys.path)
        import nnxlm
        nnxlm.Trainer, nnxlm.load_model, nnxlm.generate, nnxlm.generate_text, nnxlm.recipes.tiny()
        import nnxlm.cli, nnxlm.launch, nnxlm.trainer, nnxlm.convert, nnxlm.__main__
        assert dict(os.environ) == environ, set(os.environ.items()) ^ set(environ.items())
        assert "GLIBC_TUNABLES" not in os.environ
        assert dict(jax.config.values) == config, {k for k in config if config[k] != jax.config.values[k]}
        assert sys.path == path and sys.argv[1] == "train"
        """,
        env=_clean_environment(),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["started"]


def test_the_launch_module_imports_without_jax():
    """The restart must be decided before JAX (and XLA's allocator) is loaded."""
    result = _python("import sys, nnxlm.launch, nnxlm.errors; assert 'jax' not in sys.modules, 'jax imported'")
    assert result.returncode == 0, result.stderr


OURS = launch.with_huge_pages({})["GLIBC_TUNABLES"]  # its exact value: tests/test_bench.py


def test_the_command_line_restarts_train_with_huge_pages_and_nothing_else(tmp_path):
    env = _clean_environment(PYTHONPATH=str(tmp_path))
    if not launch.huge_pages_apply():
        pytest.skip("huge pages do not apply on this machine (glibc < 2.35, THP never, or not Linux)")
    log = tmp_path / "starts.log"
    # Python imports sitecustomize at every start: it records each process image's GLIBC_TUNABLES
    (tmp_path / "sitecustomize.py").write_text(
        f"import os\nwith open({str(log)!r}, 'a') as f:\n    f.write(os.environ.get('GLIBC_TUNABLES', '-') + '\\n')\n"
    )
    for args, starts in [
        (["-m", "nnxlm", "train", "--help"], ["-", OURS]),
        (["-m", "nnxlm", "inspect", "--help"], ["-"]),
    ]:
        log.unlink(missing_ok=True)
        result = _python("", *args, env=env)
        assert result.returncode == 0, result.stderr
        assert "usage: nnxlm" in result.stdout
        assert log.read_text().split() == starts, args
    # the console script is the same entry point
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"nnxlm": "nnxlm.launch:main"}
    log.unlink()
    result = _python(
        "import sys; sys.argv = ['/venv/bin/nnxlm', 'train', '--help']; from nnxlm.launch import main; main()",
        env=env,
    )
    assert result.returncode == 0 and "usage: nnxlm train" in result.stdout, result.stderr
    assert log.read_text().split() == ["-", OURS]


def test_every_module_imports_first_in_a_fresh_nnxlm():
    """No import cycle that works only in one order: each module is imported with no other nnxlm
    module loaded (third-party packages stay loaded, which keeps this quick)."""
    result = _python(
        """
        import importlib, os, sys, traceback
        import nnxlm, nnxlm.cli, nnxlm.trainer, nnxlm.convert  # load the third-party packages once

        root = os.path.dirname(nnxlm.__file__)
        names = []
        for directory, _, files in os.walk(root):
            for file in sorted(files):
                if file.endswith(".py"):
                    parts = os.path.relpath(os.path.join(directory, file[:-3]), os.path.dirname(root)).split(os.sep)
                    names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
        failures = []
        for name in sorted(names):
            for loaded in [m for m in sys.modules if m == "nnxlm" or m.startswith("nnxlm.")]:
                del sys.modules[loaded]
            try:
                importlib.import_module(name)
            except Exception as e:
                failures.append(f"{name}: {traceback.format_exception_only(e)[-1].strip()}")
        print(len(names), "modules")
        assert not failures, "\\n".join(failures)
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert int(result.stdout.split()[0]) > 50
