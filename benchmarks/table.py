"""Shared benchmark plumbing: wall + CPU time of this process tree, the machine line, plain-text tables.

CPU time is what makes numbers comparable on a shared machine: wall time grows with other jobs'
load, CPU seconds mostly do not. It is summed over this process and all its descendants (a local
Ray cluster's raylet and workers are children of the driver), read from /proc.
"""

from __future__ import annotations

import os
import platform
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Measure", "TreeCpu", "cpu_count", "format_table", "machine_line", "ratio", "shown"]

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_count() -> int:
    """CPUs this process may run on (the affinity mask, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def shown(path: str | Path) -> str:
    """`path` as printed in a table: relative to the current directory when it lies inside it, so
    results pasted into BENCHMARKS.md name `runs/bench/...`, not one machine's checkout."""
    if "://" in str(path):
        return str(path)
    p = Path(path).resolve()
    try:
        return str(p.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _gpu_line() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    except Exception:
        pass
    return "no GPU"


def machine_line() -> str:
    """One line: CPU model, usable CPUs, GPU, and the load average now (1/5/15 min)."""
    la = os.getloadavg()
    return (f"machine: {_cpu_model()}, {cpu_count()} CPUs, {_gpu_line()}; load average "
            f"{la[0]:.1f}/{la[1]:.1f}/{la[2]:.1f} (1/5/15 min)")


def _proc_table() -> dict[int, tuple[int, int, float]]:
    """{pid: (ppid, start ticks, cpu seconds)} of every process, from /proc/<pid>/stat."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue  # exited while we listed
        fields = stat.rsplit(b")", 1)[1].split()  # after "(comm)", which may hold spaces
        # fields[1] = ppid, [11] utime, [12] stime, [19] starttime (proc(5), 0-based after comm)
        out[int(name)] = (int(fields[1]), int(fields[19]), (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS)
    return out


class TreeCpu:
    """CPU seconds used by a process and its descendants between `start()` and `stop()`.

    A background thread samples /proc every `interval_s`, so processes that start and exit in
    between are counted up to their last sample (at most `interval_s` of CPU lost per such
    process). Waited-for children's `cutime` is not used, to avoid counting them twice.
    """

    def __init__(self, root_pid: int | None = None, interval_s: float = 1.0):
        self.root = root_pid or os.getpid()
        self.interval_s = interval_s
        self._first: dict[tuple[int, int], float] = {}
        self._last: dict[tuple[int, int], float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self, first: bool = False) -> None:
        table = _proc_table()
        for pid, (_, start, cpu) in table.items():
            p, seen = pid, 0
            while p in table and p != self.root and seen < 64:  # walk up to the root (or not)
                p, seen = table[p][0], seen + 1
            if p != self.root:
                continue
            key = (pid, start)
            if first:
                self._first[key] = cpu
            self._last[key] = cpu

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def start(self) -> TreeCpu:
        self._sample(first=True)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> float:
        """Stop sampling; returns CPU seconds of the tree since `start()`."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        return sum(cpu - self._first.get(key, 0.0) for key, cpu in self._last.items())


@dataclass
class Measure:
    """Wall and CPU seconds of a `with` block; `tree=True` adds all descendant processes' CPU."""

    tree: bool = False
    wall_s: float = 0.0
    cpu_s: float = 0.0
    load_1min: float = 0.0  # load average at the end of the block
    _t0: float = field(default=0.0, repr=False)
    _c0: float = field(default=0.0, repr=False)
    _tree: TreeCpu | None = field(default=None, repr=False)

    def __enter__(self) -> Measure:
        self._tree = TreeCpu().start() if self.tree else None
        self._c0 = time.process_time()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.wall_s = time.perf_counter() - self._t0
        self.cpu_s = self._tree.stop() if self._tree is not None else time.process_time() - self._c0
        self.load_1min = os.getloadavg()[0]


def ratio(a: float, b: float) -> str:
    """`a / b` as 'x1.23' ('-' when undefined)."""
    if not b or a != a or b != b:
        return "-"
    return f"x{a / b:.2f}"


def format_table(title: str, columns: list[str], rows: list[list], notes: list[str] = ()) -> str:
    """Plain-text table: a title line, a header, right-aligned cells (first column left), notes.

    Floats are printed with 3 significant decimals unless already formatted as strings.
    """
    def cell(v) -> str:
        if isinstance(v, float):
            return "-" if v != v else (f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}")
        return str(v)

    if any(len(row) != len(columns) for row in rows):
        raise ValueError(f"{title}: every row needs {len(columns)} cells ({', '.join(columns)})")
    text = [[cell(v) for v in row] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in text)) if text else len(c) for i, c in enumerate(columns)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [title, line(columns), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in text]
    out += [f"  {n}" for n in notes]
    return "\n".join(out)
