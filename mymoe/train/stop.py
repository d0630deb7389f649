"""Stop on SIGTERM or SIGINT at the next step boundary, on every rank together, with a checkpoint.

SLURM preemption and job time limits send SIGTERM, a user sends SIGINT with Ctrl-C, and torchrun passes
either on to its workers. Dying there would lose everything since the last checkpoint; instead the
signal only raises a flag, the ranks agree after each step whether any of them saw one (a one-number
all-reduce, so a signal that reached one rank stops them all at the same step), and the loop ends as
if the run were over: the last checkpoint is written and the process exits normally. A second signal
while stopping is left to its default action, so a stuck job can still be killed.
"""
from __future__ import annotations

import signal
import threading

import torch

from mymoe.parallel.collectives import all_reduce

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class GracefulStop:
    """Context manager: installs the handlers (in the main thread only), restores them on exit."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.signal_name = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for number in SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc):
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        return False

    def _handle(self, number, frame) -> None:
        self.signal_name = signal.Signals(number).name
        signal.signal(number, self._previous.get(number, signal.SIG_DFL))  # a second signal acts at once

    def requested(self) -> bool:
        """Whether any rank saw a signal (collective: every rank calls it after every step)."""
        flag = torch.tensor([1.0 if self.signal_name else 0.0], device=self.ctx.device)
        if self.ctx.world_size > 1:
            all_reduce(flag, "all_reduce (stop request after a step)", self.ctx.timeout_seconds, op="max")
        return bool(flag.item() > 0)
