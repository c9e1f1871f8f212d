"""Preemption: SIGTERM / SIGUSR1 become "checkpoint at the next step boundary, then exit" on every rank.

A signal only sets a flag (nothing else is safe inside a handler). The training loop folds the flag into the
all-reduce it already does every step (the non-finite check), so all ranks learn at the same step that *some* rank
was signalled, save one checkpoint together (rank 0 writes) and leave through :class:`Preempted`. Ranks that got no
signal of their own stop too, so no rank waits forever in a collective.

Exit status: ``128 + signal number`` (143 for SIGTERM, 138 for SIGUSR1), the shell's convention for "ended by that
signal": non-zero, so ``torchrun --max-restarts=N`` restarts the workers (which auto-resume from the checkpoint)
and a scheduler does not mistake a preempted job for a finished one. Re-running the same command resumes.
"""
from __future__ import annotations

import logging
import signal
import threading
from typing import Optional

__all__ = ["PREEMPTION_SIGNALS", "Preempted", "PreemptionHandler", "exit_code_for"]

log = logging.getLogger(__name__)

PREEMPTION_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name))


def exit_code_for(signum: int) -> int:
    """The process exit status after a preemption by ``signum``: ``128 + signum``."""
    return 128 + int(signum)


class Preempted(Exception):
    """Raised on every rank once the preemption checkpoint is written (or the last one is current)."""

    def __init__(self, signum: int, checkpoint: Optional[str]):
        self.signum = int(signum)
        self.checkpoint = checkpoint
        try:
            name = signal.Signals(self.signum).name
        except ValueError:
            name = f"signal {self.signum}"
        self.signal_name = name
        super().__init__(f"preempted by {name}: checkpoint {checkpoint or '(none)'} written; re-run the same command "
                         f"to resume (exit status {exit_code_for(self.signum)})")


class PreemptionHandler:
    """Installs flag-setting handlers for SIGTERM and SIGUSR1 (main thread only; elsewhere it stays inert).

    Use as a context manager around training: the previous handlers come back on exit, so library callers
    (tests, notebooks) keep their own. Repeated signals are harmless: the first one decides the exit status.
    """

    def __init__(self, signals: tuple[int, ...] = PREEMPTION_SIGNALS):
        self.signals = signals
        self.signum: Optional[int] = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        if self.signum is None:
            self.signum = signum

    def install(self) -> "PreemptionHandler":
        if threading.current_thread() is not threading.main_thread():
            log.warning("not in the main thread: SIGTERM/SIGUSR1 will not trigger a preemption checkpoint")
            return self
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def uninstall(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def __enter__(self) -> "PreemptionHandler":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()
