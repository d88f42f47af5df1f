"""How many torch threads to use: the cores nobody else is using, re-checked while training.

DESIGN.md measured it: when another process holds one of two cores, 2-thread torch
slows about 10x and 1 thread does not. So the trainer starts with the idle cores
and, every few seconds, recounts the cores other processes are busy on
(/proc/stat minus this process's own CPU time) and adjusts. ``run.threads`` fixes
the count instead. Off Linux (no /proc), every core is used.
"""
import os
import time

import torch


def _machine_times():
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    total = sum(fields)
    return total, total - fields[3] - fields[4]  # total, busy (all but idle + iowait)


def _own_busy():
    with open("/proc/self/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return int(fields[11]) + int(fields[12])  # utime + stime, in clock ticks like /proc/stat


def _cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class ThreadGovernor:
    """Call ``update()`` now and then (each training step is fine; it acts every ``interval`` s)."""

    def __init__(self, fixed=None, interval=5.0):
        self.fixed, self.interval, self.cores = fixed, interval, _cores()
        self.threads = fixed or self.cores
        self._last = None
        if fixed:
            torch.set_num_threads(fixed)
            return
        try:
            self._sample()
            time.sleep(0.25)
            self.update(force=True)
        except OSError:  # no /proc: take every core
            self.fixed = self.cores
            torch.set_num_threads(self.cores)

    def _sample(self):
        self._last = (time.monotonic(), *_machine_times(), _own_busy())

    def update(self, force=False):
        if self.fixed or (not force and time.monotonic() - self._last[0] < self.interval):
            return self.threads
        _, total0, busy0, own0 = self._last
        self._sample()
        _, total1, busy1, own1 = self._last
        if total1 == total0:
            return self.threads
        share = (os.cpu_count() or self.cores) / (total1 - total0)  # ticks -> cores busy on average
        others = max(0.0, (busy1 - busy0) - (own1 - own0)) * share
        threads = max(1, min(self.cores, round(self.cores - others)))
        if threads != self.threads or force:
            self.threads = threads
            torch.set_num_threads(threads)
        return self.threads
