"""What every benchmark shares: the machine's description, medians, worker subprocesses and the
results table that `python -m bench` writes to bench/results.md.

Each benchmark runs in its own Python process, so that one framework's threads, allocator state
and memory peak do not leak into another's figures; a worker prints one JSON object as its last
line of output, which run_worker returns.
"""

import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def median(values) -> float:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


def cpu_model() -> str:
    """The CPU's model name (and family, which tells generations apart on AMD), from /proc/cpuinfo."""
    fields = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        return platform.processor() or platform.machine()
    name = fields.get("model name", platform.machine())
    family = fields.get("cpu family")
    return f"{name} (family {family})" if family else name


def versions() -> dict[str, str]:
    """Versions of the stack, without importing the heavy packages."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for package in ("jax", "jaxlib", "flax", "torch", "transformers"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return out


def machine_line(skip=()) -> str:
    """'<cpu>, <n> cores, CPU only, <package versions>, <os>': the machine line of a results section
    (skip: packages left out, e.g. a peer the benchmark does not run)."""
    packages = ", ".join(f"{name} {version}" for name, version in versions().items() if name not in skip)
    return f"{cpu_model()}, {os.cpu_count()} cores, CPU only, {packages}, {platform.system()} {platform.release()}"


def run_worker(args: list[str], *, timeout: float = 600, env: dict | None = None) -> dict:
    """Runs `python -m <args>` in the repository and returns the JSON object of its last output line
    (see emit), with the worker's wall time added as "wall_s"."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env
    )
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"{' '.join(args)} printed no result:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    result = json.loads(lines[-1])
    result.setdefault("wall_s", time.perf_counter() - start)
    return result


def report(result: dict, markdown: str, output: str | None, as_json: bool) -> None:
    """A benchmark's ending: its results.md section written to `output` (if given), then the result
    as the JSON line `python -m bench` reads (as_json) or the section printed."""
    if output:
        with open(output, "w", encoding="utf-8") as f:
            f.write(markdown)
    if as_json:
        emit(result)
    else:
        print(markdown)


def emit(result: dict) -> None:
    """A worker's last line: its result as JSON, with this process's peak resident memory."""
    result.setdefault("peak_rss_mb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps(result), flush=True)


def wait_with_usage(process: subprocess.Popen, timeout: float, tick=None) -> resource.struct_rusage:
    """Waits for `process` (killing it after timeout seconds), calling tick() every 10 ms meanwhile,
    and returns its own resource usage (ru_maxrss: its peak RSS in KiB), which Popen.wait discards."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            process.returncode = os.waitstatus_to_exitcode(status)
            return usage
        if tick is not None:
            tick()
        if time.monotonic() > deadline:
            process.kill()
        time.sleep(0.01)


@dataclasses.dataclass
class Row:
    """One line of the results table: nnxlm's median beside the peer's from the same invocation.

    higher_is_better says which way the ratio points: the table's ratio is always "how many times
    better nnxlm is" (> 1: nnxlm ahead), so tokens/s divide ours by theirs and times theirs by ours.
    """

    benchmark: str
    metric: str
    ours: float | None
    peer: float | None = None
    fmt: str = "{:,.0f}"
    higher_is_better: bool = True
    repeats: int | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.ours is None or self.peer is None or not self.ours or not self.peer:
            return None
        return self.ours / self.peer if self.higher_is_better else self.peer / self.ours


def _cell(value: float | None, fmt: str) -> str:
    return "—" if value is None else fmt.format(value)


def results_markdown(title: str, machine_lines: list[str], rows: list[Row], notes: list[str] = ()) -> str:
    """The markdown of bench/results.md: the machine, then one table row per Row."""
    peer_name = "HF transformers (PyTorch eager)"
    lines = [f"# {title}", "", *[f"- {line}" for line in machine_lines], ""]
    lines.append(f"| benchmark | metric | nnxlm | {peer_name} | nnxlm advantage | repeats |")
    lines.append("|---|---|---:|---:|---:|---:|")
    for row in rows:
        ratio = "—" if row.ratio is None else f"{row.ratio:.2f}×"
        metric = f"{row.metric} ({row.note})" if row.note else row.metric
        repeats = "—" if row.repeats is None else str(row.repeats)
        ours, peer = _cell(row.ours, row.fmt), _cell(row.peer, row.fmt)
        lines.append(f"| {row.benchmark} | {metric} | {ours} | {peer} | {ratio} | {repeats} |")
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


def peak_worker(framework: str) -> dict:
    """Best fp32 matmul FLOP/s of this process (2 n^3 FLOPs per n x n product), over two sizes."""
    if framework == "jax":
        from nnxlm.metrics import measure_matmul_peak

        return {"flops": max(measure_matmul_peak(size, repeats=10) for size in (1536, 2048))}
    import torch

    best = 0.0
    for size in (1536, 2048):
        a = torch.randn(size, size)
        a @ a
        for _ in range(10):
            start = time.perf_counter()
            a @ a
            best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return {"flops": best}


if __name__ == "__main__":  # python -m bench.common peak jax|torch
    emit(peak_worker(sys.argv[2]))


class Worker:
    """A long-lived benchmark process, `python -m MODULE ARGS...`, speaking JSON lines: started
    (ready: its first answer), asked commands (`ask`), closed ("quit": its last answer) or killed.
    Its stderr goes to log_path, whose tail is raised if it ends without answering."""

    def __init__(self, module: str, args: list[str], log_path: str):
        self.log = open(log_path, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )
        self.ready = self._answer()

    def _answer(self) -> dict:
        for line in self.process.stdout:
            if line.startswith("{"):
                return json.loads(line)
        self.log.flush()
        with open(self.log.name, encoding="utf-8", errors="replace") as f:
            raise RuntimeError(f"{' '.join(self.process.args[2:])} ended:\n{f.read()[-3000:]}")

    def ask(self, command: str) -> dict:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self._answer()

    def close(self) -> dict:
        try:
            return self.ask("quit")
        finally:
            self.process.wait(60)
            self.log.close()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(60)
        self.log.close()
