"""Stop on SIGTERM or SIGINT at the next step boundary, on every rank together, with a checkpoint.

SLURM preemption and job time limits send SIGTERM, a user sends SIGINT with Ctrl-C, and torchrun passes
either on to its workers. Dying there would lose everything since the last checkpoint; instead the
signal only raises a flag, the ranks agree after each step whether any of them saw one (a one-number
all-reduce, so a signal that reached one rank stops them all at the same step), and the loop ends as
if the run were over: the last checkpoint is written and the process exits normally. A second signal
while stopping is left to its default action, so a stuck job can still be killed.

The wait is bounded. Evaluation asks between its batches, so a long one ends early. A single process
(no other rank to keep in step with) does not wait for the end of a long step either: once
`train.stop_timeout_seconds` have passed since the signal, or at a second signal, the step's forward and
backward are abandoned (StopNow, raised in the main thread; the trainer rewinds its data position and RNG
to the step boundary) and the boundary state is saved, well inside the grace period of torchrun or SLURM;
a third signal acts at once.
"""

from __future__ import annotations

import signal
import threading

import torch

from mymoe.parallel.collectives import all_reduce

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopNow(Exception):
    """The stop deadline passed (or a second signal came) during a step's forward and backward."""


class GracefulStop:
    """Context manager: installs the handlers (in the main thread only), restores them on exit.

    With a trainer and a deadline, in a single process, the deadline or a second signal raises StopNow while
    the trainer is inside a step's forward and backward (`trainer.resume_point` is set); elsewhere the step
    boundary is near and the flag is enough.
    """

    def __init__(self, ctx, trainer=None, deadline_seconds: float = 0.0):
        self.ctx = ctx
        self.signal_name = None
        self._previous = {}
        self.trainer = trainer
        self.deadline_seconds = deadline_seconds if ctx.world_size == 1 and trainer is not None else 0.0

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for number in SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
            if self.deadline_seconds > 0:
                self._previous[signal.SIGALRM] = signal.signal(signal.SIGALRM, self._deadline)
        return self

    def __exit__(self, *exc):
        if signal.SIGALRM in self._previous:
            signal.setitimer(signal.ITIMER_REAL, 0)
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        return False

    def _handle(self, number, frame) -> None:
        if self.signal_name is not None or self.deadline_seconds <= 0:
            signal.signal(number, self._previous.get(number, signal.SIG_DFL))  # the next signal acts at once
        if self.signal_name is None:
            self.signal_name = signal.Signals(number).name
            if self.deadline_seconds > 0:
                signal.setitimer(signal.ITIMER_REAL, self.deadline_seconds)
        else:
            self._abandon_step(f"a second {signal.Signals(number).name}")

    def _deadline(self, number, frame) -> None:
        self._abandon_step(f"train.stop_timeout_seconds={self.deadline_seconds:g} after {self.signal_name}")

    def _abandon_step(self, why: str) -> None:
        if getattr(self.trainer, "resume_point", None) is not None:
            raise StopNow(why)

    def requested(self) -> bool:
        """Whether any rank saw a signal (collective: every rank calls it after every step)."""
        if self.ctx.world_size == 1:  # nothing to agree on, so nothing to read from the device
            return self.signal_name is not None
        flag = torch.tensor([1.0 if self.signal_name else 0.0], device=self.ctx.device)
        if self.ctx.world_size > 1:
            all_reduce(flag, "all_reduce (stop request after a step)", self.ctx.timeout_seconds, op="max")
        return bool(flag.item() > 0)
