"""What a long training run has to survive, in one place.

- Ctrl-C or SIGTERM (a cluster's preemption notice): the first one asks the loop to stop at the
  next micro-batch boundary, where it writes a checkpoint and exits; a second Ctrl-C stops at
  once (KeyboardInterrupt), keeping the last checkpoint.
- Non-finite losses: one now and then (an fp16 overflow, a bad batch) is skipped; K in a row mean
  the run has diverged, and it stops with the last good checkpoint kept (loop.py never writes
  a checkpoint after a non-finite optimizer step: such steps are skipped, see optimizer_step).
"""
from __future__ import annotations

import math
import signal
import sys
import threading


class TrainingStopped(Exception):
    """The run stopped on purpose; `exit_code` is what the command line returns (130 for Ctrl-C)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class StopRequest:
    """Context manager: while active, SIGINT/SIGTERM set `requested` instead of killing the run."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self.signal_name = ""
        self._previous = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now; the last checkpoint is kept
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        print(f"\n[train] {self.signal_name}: stopping after this batch and writing a checkpoint "
              "(Ctrl-C again to stop at once, keeping the previous checkpoint)", file=sys.stderr, flush=True)


class NonFiniteLosses:
    """Counts non-finite losses; `limit` consecutive ones stop the run."""

    def __init__(self, limit: int):
        self.limit = limit
        self.streak = 0  # consecutive non-finite losses up to now
        self.total = 0  # in the current epoch (logged, then reset)

    def observe(self, loss: float, where: str) -> bool:
        """Record one loss; True if finite. Raises TrainingStopped at `limit` in a row."""
        if math.isfinite(loss):
            self.streak = 0
            return True
        self.streak += 1
        self.total += 1
        print(f"\n[train] non-finite loss ({loss}) at {where}; its gradients will be skipped "
              f"({self.streak}/{self.limit} in a row)", file=sys.stderr, flush=True)
        if self.streak >= self.limit:
            raise TrainingStopped(
                f"training diverged: {self.streak} consecutive non-finite losses (the last at {where}); the "
                "last good checkpoint is kept in the run directory. Lower --lr, try --precision fp32 or bf16, "
                "or raise --max-nonfinite.", exit_code=1)
        return False

    def state_dict(self) -> dict:
        return {"streak": self.streak, "total": self.total}

    def load_state_dict(self, state: dict) -> None:
        self.streak, self.total = state["streak"], state["total"]
