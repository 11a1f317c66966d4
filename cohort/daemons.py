"""Small helpers for launchers of external daemons (etcd, Ceph): ports, stopping a
process group, and a foreground ``main`` that waits for SIGINT/SIGTERM."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the daemon binds it next)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def stop_group(popen: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> None:
    """SIGTERM the process group of ``popen`` (started with a new session), then SIGKILL
    it if it has not exited within ``timeout`` seconds."""
    if popen is None or popen.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(popen.pid, signal.SIGTERM)
    try:
        popen.wait(timeout)
    except subprocess.TimeoutExpired:
        kill_group(popen)


def kill_group(popen: subprocess.Popen[bytes] | None) -> None:
    """SIGKILL the process group of ``popen`` and reap it."""
    if popen is None or popen.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(popen.pid, signal.SIGKILL)
    popen.wait()


def wait_for_termination() -> None:
    """Block until SIGINT or SIGTERM (a launcher's foreground ``main``)."""
    sigs = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    signal.sigwait(sigs)
