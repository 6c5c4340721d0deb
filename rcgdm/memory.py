"""Peak memory of a block of work: CUDA's allocator statistics on a GPU, the process RSS (sampled) on the CPU."""

from __future__ import annotations

import threading

import torch


class PeakMemory:
    """`with PeakMemory(device) as m: ...` -> m.peak (bytes at the highest point), m.used (m.peak above the level at entry).

    On CUDA: torch.cuda.max_memory_allocated after resetting the peak at entry. On the CPU: the process's resident set
    size, read every `interval` seconds by a thread (psutil, which accelerate installs)."""

    def __init__(self, device: torch.device, interval: float = 0.002) -> None:
        self.device, self.interval, self.peak, self.used = device, interval, 0, 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            import psutil

            self.process, self.stop = psutil.Process(), threading.Event()
            self.start = self.peak = self.process.memory_info().rss
            self.thread = threading.Thread(target=self._poll, daemon=True)
            self.thread.start()
        return self

    def _poll(self) -> None:
        while not self.stop.wait(self.interval):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.stop.set()
            self.thread.join()
            self.peak = max(self.peak, self.process.memory_info().rss)
        self.used = self.peak - self.start
