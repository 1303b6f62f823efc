"""Profiler traces of training steps (MaxText's enable_profiler), for TensorBoard and Perfetto.

With the Trainer's profile_steps = N > 0, fit() traces N steps with jax.profiler, after skipping
the first profile_skip_steps steps of the run (counted from the step it starts or resumes at: the
first step compiles, which would swamp the trace). The trace goes to `<workdir>/profile/`, where
jax.profiler lays it out as TensorBoard's profile plugin reads it:

    <workdir>/profile/plugins/profile/<YYYY_MM_DD_HH_MM_SS>/<host>.xplane.pb        TensorBoard
                                                            <host>.trace.json.gz    Chrome trace
                                                            perfetto_trace.json.gz  ui.perfetto.dev

Every step, traced or not, is marked by a "train" step annotation with its step number (as in
metrics.jsonl), so the viewers show step boundaries, also in a trace taken from outside
(jax.profiler.start_server). The main process alone traces.
"""

import pathlib
import sys
import tempfile

import jax
from etils import epath

from nnxlm.errors import UserError
from nnxlm.files import absolute, copy_atomically, is_local

PROFILE_DIR = "profile"


class StepProfiler:
    """Traces `steps` steps of a run that starts after step `start_step`, skipping `skip_steps`.

    Around each step of the loop: `with profiler.step(n):` (n, the step about to run: starts the
    trace before the first traced step, and marks the step); once step n has finished, stop() if
    ends_at(n); in a finally, close(n).
    """

    def __init__(self, workdir, start_step: int, skip_steps: int, steps: int, enabled: bool = True):
        self.first = start_step + skip_steps + 1
        self.last = self.first + steps - 1
        self.enabled = enabled and steps > 0
        self.destination = absolute(epath.Path(workdir) / PROFILE_DIR)
        self.traced: list[int] = []
        self._running = False
        self._scratch = None  # a local directory the profiler writes to when the run directory is remote

    def step(self, step: int) -> jax.profiler.StepTraceAnnotation:
        """The annotation of `step`; starts the trace first when `step` is the first traced one."""
        if self.enabled and step == self.first:
            self._start()
        if self.enabled and self.first <= step <= self.last:
            self.traced.append(step)
        return jax.profiler.StepTraceAnnotation("train", step_num=step)

    def ends_at(self, step: int) -> bool:
        """Whether the trace ends after `step`: call stop() once that step has finished."""
        return self._running and step == self.last

    def close(self, step: int) -> None:
        """Ends a trace still running (the run stopped or failed inside the traced steps), and says
        so when the run ended (at `step`) before the first traced step."""
        if self._running:
            self.stop()
        elif self.enabled and step < self.first:
            print(
                f"nnxlm: no step profiled: the run ended at step {step}, before step {self.first} "
                "(profile_skip_steps counts from where the run started)",
                file=sys.stderr,
            )

    def _start(self) -> None:
        if is_local(self.destination):
            log_dir = self.destination
        else:
            # jax.profiler writes through XLA's own file systems (local, and gs:// only with Google
            # credentials); every run directory epath opens works with a local trace copied over
            self._scratch = tempfile.TemporaryDirectory(prefix="nnxlm-profile-")
            log_dir = self._scratch.name
        try:
            # perfetto_trace.json.gz: the Chrome trace without its metadata, which ui.perfetto.dev does not take
            jax.profiler.start_trace(str(log_dir), create_perfetto_trace=True)
        except RuntimeError:  # jax.profiler runs one trace at a time
            raise UserError(
                "cannot start the profiler: a JAX profiler trace is already running in this process "
                "(jax.profiler.start_trace or trace); stop it, or set profile_steps=0"
            ) from None
        self._running = True

    def stop(self) -> None:
        """Ends the trace and writes it (copied into a remote run directory)."""
        self._running = False
        jax.profiler.stop_trace()
        if self._scratch is not None:
            scratch = pathlib.Path(self._scratch.name)  # a local directory of our own (epath's rglob refuses **)
            try:
                for file in sorted(scratch.rglob("*")):
                    if file.is_file():
                        target = self.destination / file.relative_to(scratch).as_posix()
                        target.parent.mkdir(parents=True, exist_ok=True)
                        copy_atomically(file, target)
            finally:
                self._scratch.cleanup()
                self._scratch = None
        steps = f"{self.traced[0]}" if len(self.traced) == 1 else f"{self.traced[0]}-{self.traced[-1]}"
        print(f"nnxlm: profile of step {steps} written to {self.destination}", file=sys.stderr)
