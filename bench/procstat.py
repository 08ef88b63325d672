"""CPU time and memory of processes, read from /proc (Linux).

CPU seconds are the bench's noise-proof second opinion: on a shared 2-core machine throughput
swings with whatever else runs, but the CPU time a PostgreSQL cluster spends per transaction
barely does.  Everything here returns None instead of raising when /proc is not readable (a
remote --dsn server, another OS), so the bench reports "n/a" rather than failing.
"""

from __future__ import annotations

import os
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ")".
    return text[text.rindex(")") + 2:].split()


def cpu_seconds(pid: int, *, children: bool = False) -> float | None:
    """utime + stime of ``pid`` (plus its reaped children's with ``children``), in seconds."""
    f = _stat_fields(pid)
    if f is None:
        return None
    # After the command name: state=0 ... utime=11, stime=12, cutime=13, cstime=14.
    ticks = int(f[11]) + int(f[12])
    if children:
        ticks += int(f[13]) + int(f[14])
    return ticks / TICKS


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (all threads' children lists)."""
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            out.extend(int(p) for p in Path(f"/proc/{pid}/task/{tid}/children").read_text().split())
        except OSError:
            continue
    return out


def tree_cpu_seconds(root: int) -> float | None:
    """CPU seconds used so far by a process tree: the root (with the children it has reaped, e.g.
    PostgreSQL backends that have exited) plus every live child.  Differences of two readings are
    what the tree spent in between."""
    total = cpu_seconds(root, children=True)
    if total is None:
        return None
    for pid in child_pids(root):
        total += cpu_seconds(pid, children=True) or 0.0
    return total


def machine_busy_seconds() -> float | None:
    """CPU seconds every core of the machine has been busy so far (all processes, anyone's):
    /proc/stat's first line without idle and iowait."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    # cpu user nice system idle iowait irq softirq steal (guest time is already in user)
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / TICKS


def vm_hwm_mb(pid: int) -> float | None:
    """Peak resident set size (VmHWM) in MB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def postmaster_pid(datadir: Path) -> int | None:
    """The server's pid from postmaster.pid (first line), if readable."""
    try:
        return int((datadir / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
