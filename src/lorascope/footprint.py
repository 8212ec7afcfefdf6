"""How much memory a block of work takes and how much disk a saved model takes: measured the
same way for training runs and for serving strategies."""

from __future__ import annotations

import threading
from pathlib import Path

import psutil

MB = 2**20


def rss() -> int:
    return psutil.Process().memory_info().rss


class PeakRss:
    """Peak resident set of this process inside a block. Linux: the kernel's high-water mark
    (VmHWM), reset on entry through /proc/self/clear_refs; elsewhere psutil sampled every ms."""

    def __enter__(self) -> PeakRss:
        self._samples, self._stop, self._thread = [rss()], threading.Event(), None
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.method = "VmHWM reset via /proc/self/clear_refs after loading"
        except OSError:
            self.method = "psutil RSS sampled every 1 ms"
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self._samples.append(rss())

    def __exit__(self, *exc) -> None:
        if self._thread is None:
            status = Path("/proc/self/status").read_text()
            self.peak = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))) * 1024
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(*self._samples, rss())


def weights_bytes(folder: str | None) -> float:
    """Size of the weight files a load reads (safetensors if present, else .bin); NaN for a Hub id."""
    if folder is None or not Path(folder).is_dir():
        return float("nan")
    files = list(Path(folder).glob("*.safetensors")) or list(Path(folder).glob("*.bin"))
    return sum(f.stat().st_size for f in files)


def weights_mb(folder: str | None) -> float:
    return weights_bytes(folder) / MB
