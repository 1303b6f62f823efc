"""The command-line entry point (`nnxlm` and `python -m nnxlm` call main): `nnxlm train` restarts
itself, once, with huge pages for malloc's large allocations.

XLA on CPU allocates a step's temporary buffers afresh at every step (for bench_llama_20m about
570 MB, mostly the [tokens, vocabulary] logits and their gradient). With 4 KiB pages the kernel
zero-fills them page by page: ~130,000 page faults a step, a third of the step time. Started with
GLIBC_TUNABLES=glibc.malloc.hugetlb=1, glibc's malloc asks for transparent huge pages (madvise)
instead; the faults fall a hundredfold and the step takes 0.28 s instead of 0.40 s (bench/README.md).
Two more settings keep the buffers of up to 32 MiB in malloc's heap instead of mapping and unmapping
each (mmap_threshold) and keep the freed heap for the next step instead of returning it
(trim_threshold): the kernel time of a small Llama's step at 2,048 tokens falls from 12 % to 4 % of
it and the step is 5 % faster (bench.long_context's model, medians of 8 interleaved blocks).

glibc reads its tunables only when a process starts, so the command re-executes itself with the
setting before anything heavy is imported: this module imports nothing of nnxlm's but the package
(whose names load lazily, without JAX) until the restart is decided. Only the command line does it:
importing nnxlm as a library never re-executes the process nor changes its environment. Nothing
happens either when GLIBC_TUNABLES already sets hugetlb, off glibc 2.35+, when the kernel's THP mode
is "never", or with NNXLM_HUGE_PAGES=0. Python programs that train get the same by starting Python
with the variable set.
"""

import os
import sys

TUNABLE = "glibc.malloc.hugetlb"  # whether the settings are in place: a restart happened or the user set it
MALLOC_SETTINGS = {TUNABLE: 1, "glibc.malloc.mmap_threshold": 32 << 20, "glibc.malloc.trim_threshold": 4 << 30}


def main() -> int:
    """The `nnxlm` command: restarts `nnxlm train` with huge pages, then runs the command line."""
    restart_train_command_with_huge_pages()
    from nnxlm.cli import main as cli_main  # JAX comes in with it: after the restart

    return cli_main()


def restart_train_command_with_huge_pages() -> None:
    if _is_train_command() and huge_pages_apply():
        os.environ.update(with_huge_pages(os.environ))
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def with_huge_pages(environ) -> dict[str, str]:
    """A copy of the environment `environ` with glibc's malloc set to use huge pages and keep large
    buffers (MALLOC_SETTINGS), after the user's own tunables, which win where they name the same one."""
    tunables = [t for t in environ.get("GLIBC_TUNABLES", "").split(":") if t]
    named = {t.split("=", 1)[0] for t in tunables}
    tunables += [f"{name}={value}" for name, value in MALLOC_SETTINGS.items() if name not in named]
    return {**environ, "GLIBC_TUNABLES": ":".join(tunables)}


def huge_pages_apply() -> bool:
    """Whether a restart would change anything here (see the module docstring)."""
    if os.environ.get("NNXLM_HUGE_PAGES") == "0" or TUNABLE in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        libc, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        major, minor = (int(x) for x in version.split(".")[:2])
        with open("/sys/kernel/mm/transparent_hugepage/enabled", encoding="ascii") as f:
            thp = f.read()
    except (AttributeError, ValueError, OSError):  # not Linux with glibc
        return False
    return libc == "glibc" and (major, minor) >= (2, 35) and "[never]" not in thp


def _is_train_command() -> bool:
    """This process is `nnxlm train ...` or `python -m nnxlm train ...`: sys.argv[0] is the console
    script, nnxlm's __main__.py once runpy runs it, or "-m" while runpy imports the package. Anything
    else (a program that calls main itself, pytest) is not re-executed."""
    if sys.argv[1:2] != ["train"]:
        return False
    program = sys.argv[0]
    if os.path.basename(program) == "nnxlm":
        return True
    if os.path.abspath(program) == os.path.join(os.path.dirname(os.path.abspath(__file__)), "__main__.py"):
        return True
    argv = sys.orig_argv
    return program == "-m" and "-m" in argv and argv[argv.index("-m") + 1 : argv.index("-m") + 2] == ["nnxlm"]
