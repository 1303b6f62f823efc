"""Stopping a run cleanly on SIGTERM (a preempted machine, a scheduler) or Ctrl-C.

The first signal asks the training loop to stop after the step it is running: it saves a
checkpoint, waits for it to be written and returns, so the same command resumes exactly. A second
signal exits at once: orbax writes every checkpoint under a temporary name and renames it when it
is complete, so an exit in the middle of a save leaves no directory that looks like a checkpoint.
"""

import os
import signal
import sys
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequests:
    """Context manager: while inside, SIGTERM and SIGINT set `signal` instead of ending the process.
    Outside the main thread (where Python cannot take signals) it does nothing."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def _handle(self, number, frame) -> None:
        name = signal.Signals(number).name
        if self.signal is not None:
            print(f"\nnnxlm: {name} again: exiting now; the last complete checkpoint stays the latest", file=sys.stderr)
            sys.stderr.flush()
            os._exit(128 + number)
        self.signal = number
        print(
            f"\nnnxlm: {name}: finishing this step and saving a checkpoint (send it again to exit at once)",
            file=sys.stderr,
        )
