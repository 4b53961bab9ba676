"""The processes of the session's in-process Ray cluster (`ray_local`), for tests that kill them."""

from __future__ import annotations

from pathlib import Path


def _raylet_pid() -> int:
    """PID of the raylet of this process's Ray cluster (its workers are its descendants)."""
    import ray

    node = ray._private.worker._global_node
    return node.all_processes["raylet"][0].process.pid


def _parent(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("PPid:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def pids_with(needle: str) -> list[int]:
    """PIDs of this session's Ray processes whose title (`ray::ClassName...`) contains `needle`.

    Only descendants of our own raylet: other Ray clusters on the machine are never touched.
    """
    raylet = _raylet_pid()
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle not in cmd:
            continue
        pid, hops = int(p.name), 0
        while pid > 1 and pid != raylet and hops < 10:
            pid, hops = _parent(pid), hops + 1
        if pid == raylet:
            out.append(int(p.name))
    return out
