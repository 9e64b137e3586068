"""The SM clock and power log that the device probes keep while they time (``nvidia-smi`` every 50 ms), and its
parser: reports/fp8_attention/probe_attn_timer.py and reports/fp8_matmul/probe_row_gap.py."""

from __future__ import annotations

import datetime
import subprocess
from pathlib import Path

QUERY = "timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_event_reasons.active"


def start(path: Path) -> subprocess.Popen:
    """``nvidia-smi`` logging to ``path`` (CSV) every 50 ms until the caller terminates it."""
    cmd = ["nvidia-smi", f"--query-gpu={QUERY}", "--format=csv", "-lms", "50"]
    return subprocess.Popen(cmd, stdout=path.open("w"), stderr=subprocess.DEVNULL)


def samples(path: Path) -> list[tuple[float, float, float, str]]:
    """(unix time, SM MHz, W, clock-event reasons) per line of ``start``'s log (its timestamps are the machine's
    local time, as ``time.time()`` there: UTC on the device)."""
    out = []
    for line in path.read_text().splitlines()[1:]:
        f = [x.strip() for x in line.split(",")]
        try:
            t = datetime.datetime.strptime(f[0], "%Y/%m/%d %H:%M:%S.%f").replace(tzinfo=datetime.UTC).timestamp()
            out.append((t, float(f[1].split()[0]), float(f[3].split()[0]), f[5]))
        except (ValueError, IndexError):
            continue
    return out
