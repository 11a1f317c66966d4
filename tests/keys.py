"""One cluster key for tests that start servers without a LocalCluster.

A key file is made once per test process (mode 0600, removed at exit), for child
processes that take ``--cluster-key FILE``; ``KEY`` and ``MEMBER`` are for in-process
servers and clients.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

from cohort.auth import ClusterKey, Verifier

_DIR = Path(tempfile.mkdtemp(prefix="cohort-test-key-"))
atexit.register(shutil.rmtree, _DIR, True)
KEY_FILE = str(_DIR / "cluster.key")
ClusterKey.create_file(KEY_FILE)
KEY = ClusterKey.load(KEY_FILE)
MEMBER = KEY.member("test")


def verifier() -> Verifier:
    return Verifier(KEY)
