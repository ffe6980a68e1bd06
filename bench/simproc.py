"""The loopback simulator in its own process, so its CPU stays out of the measured process's GIL."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

_LISTENING = re.compile(r"listening on (http://\S+)")


@dataclass(frozen=True)
class SimulatorProcess:
    base_url: str
    pid: int
    latency: float

    def cpu_seconds(self) -> float:
        """User + system CPU the simulator has used so far (Linux /proc)."""
        with open(f"/proc/{self.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def simulator_process(latency: float, root: Path | None = None) -> Iterator[SimulatorProcess]:
    """`python -m django_wxpay_close.testing --latency L --unknown-orders open` on a free port.

    `root`: run the simulator of that checkout (bench/ab.py compares two) instead of the installed one.
    """
    command = [
        sys.executable, "-m", "django_wxpay_close.testing", "--port", "0",
        "--latency", str(latency), "--unknown-orders", "open",
    ]
    env = None if root is None else {**os.environ, "PYTHONPATH": str(root)}
    with tempfile.TemporaryFile("w+") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, text=True, cwd=root, env=env)
        try:
            yield SimulatorProcess(base_url=_wait_for_url(process, output), pid=process.pid, latency=latency)
        finally:
            process.terminate()
            process.wait(timeout=30)


def _wait_for_url(process: subprocess.Popen[str], output: IO[str]) -> str:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        output.seek(0)
        if match := _LISTENING.search(output.read()):
            return match[1]
        if process.poll() is not None:
            output.seek(0)
            raise RuntimeError(f"the simulator exited with status {process.returncode}: {output.read()}")
        time.sleep(0.05)
    output.seek(0)
    raise RuntimeError(f"the simulator did not start listening within 30 s; it printed: {output.read()[-2000:]!r}")
