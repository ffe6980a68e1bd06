"""The loopback simulator in its own process, so its CPU stays out of the measured process's GIL."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

_LISTENING = re.compile(r"listening on (http://\S+)")


@dataclass(frozen=True)
class SimulatorProcess:
    base_url: str
    pid: int
    latency: float
    _process: subprocess.Popen[str] | None = field(default=None, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def cpu_seconds(self) -> float:
        """User + system CPU the simulator has used so far (Linux /proc)."""
        with open(f"/proc/{self.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def requests_per_order(self, prefix: str) -> dict[str, Any]:
        """How many closeorder requests each order numbered `prefix`… got since the last call (bench.simserver)."""
        if self._process is None or self._process.stdin is None or self._process.stdout is None:
            raise RuntimeError("this simulator does not count requests (it is the package's command-line one)")
        with self._lock:
            self._process.stdin.write(f"count {prefix}\n")
            self._process.stdin.flush()
            counts: dict[str, Any] = json.loads(self._process.stdout.readline())
            return counts


@contextmanager
def simulator_process(latency: float, root: Path | None = None) -> Iterator[SimulatorProcess]:
    """A simulator on a free port that closes any order it is asked about, `latency` seconds per answer.

    Without `root`: `python -m bench.simserver`, which also counts requests per order. With `root` (bench.ab
    compares two checkouts): that checkout's `python -m django_wxpay_close.testing --unknown-orders open`.
    """
    if root is None:
        command = [sys.executable, "-m", "bench.simserver", str(latency)]
        env = None
    else:
        command = [sys.executable, "-m", "django_wxpay_close.testing", "--port", "0", "--latency", str(latency),
                   "--unknown-orders", "open"]
        env = {**os.environ, "PYTHONPATH": str(root)}
    with tempfile.TemporaryFile("w+") as log:
        if root is None:  # the URL comes on stdout, which then carries the answers to `count`
            process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                                       cwd=Path(__file__).resolve().parent.parent)
            try:
                line = process.stdout.readline() if process.stdout else ""
                if not (match := _LISTENING.search(line)):
                    process.wait(timeout=30)
                    log.seek(0)
                    raise RuntimeError(
                        f"the simulator did not start ({process.returncode}): {line}{log.read()[-2000:]}")
                yield SimulatorProcess(match[1], process.pid, latency, process)
            finally:
                if process.stdin:
                    process.stdin.close()
                process.terminate()
                process.wait(timeout=30)
            return
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True, cwd=root, env=env)
        try:
            yield SimulatorProcess(base_url=_wait_for_url(process, log), pid=process.pid, latency=latency)
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
