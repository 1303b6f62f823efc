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
            _say(f"\nnnxlm: {name} again: exiting now; the last complete checkpoint stays the latest\n")
            os._exit(128 + number)
        self.signal = number
        _say(f"\nnnxlm: {name}: finishing this step and saving a checkpoint (send it again to exit at once)\n")


def _say(text: str) -> None:
    """Writes to stderr from a signal handler, in one write straight to the file descriptor: the
    handler runs between two bytecodes of the main thread, which may be in the middle of a write to
    sys.stderr itself (progress output, or the first signal's message when a second signal arrives),
    where another write to the same buffered stream raises RuntimeError (reentrant call) instead of
    stopping or exiting."""
    try:
        sys.stderr.flush()  # what was printed before
    except (RuntimeError, OSError, ValueError):
        pass  # the interrupted write holds the buffer
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a stream without a file (io.StringIO)
        print(text, end="", file=sys.stderr)
        return
    os.write(fd, text.encode())
