"""`baton up` stops workers it did not start (the control plane's, a Ray actor's) by the pid in their record."""
from __future__ import annotations

import subprocess
import sys

from baton.controlplane.backends.local import stop_processes
from baton.devtools.local_cluster import WorkerProcess


def test_a_worker_known_by_pid_is_stopped_and_seen_gone():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        worker = WorkerProcess(proc.pid)
        assert worker.poll() is None
        stop_processes([worker], timeout_s=10)
        # Not reaped yet (this test is its parent): a zombie has exited all the same.
        assert worker.poll() == 0
        assert proc.wait(timeout=1) == -15
    finally:
        proc.kill()
        proc.wait()
