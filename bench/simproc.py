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
def simulator_process(latency: float) -> Iterator[SimulatorProcess]:
    """`python -m django_wxpay_close.testing --latency L --unknown-orders open` on a free port."""
    command = [
        sys.executable, "-m", "django_wxpay_close.testing", "--port", "0",
        "--latency", str(latency), "--unknown-orders", "open",
    ]
    with tempfile.TemporaryFile("w+") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, text=True)
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
    raise RuntimeError("the simulator did not start listening within 30 s")
