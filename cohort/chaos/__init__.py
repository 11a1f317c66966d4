"""Jepsen-style fault injection for Cohort: histories, checkers, nemeses and a runner.

Everything here except :mod:`cohort.chaos.runner` works without a running cluster:

* :mod:`cohort.chaos.history` — the recorded operations (``Op``, ``History``, ``Recorder``).
* :mod:`cohort.chaos.linearizability` — a WGL/Lowe checker for per-key registers.
* :mod:`cohort.chaos.lock_check` — DLM lock safety, fencing and single-owner checks.
* :mod:`cohort.chaos.proxy` — a fault-injecting TCP proxy.
* :mod:`cohort.chaos.faulty_store` — a fault-injecting ``Store`` wrapper.
* :mod:`cohort.chaos.nemesis` — seeded schedules of process and network faults.
* :mod:`cohort.chaos.runner` — clients + nemesis against a cluster, checks, report.

Running it
----------
The short CI run is ``tests/chaos/test_cluster_chaos.py::test_short_chaos_run`` (fixed
seed, ~15 s); the ``slow`` tests add client-side network faults and a deliberately broken
build (ack before the log write is durable) that the harness must flag.

A long run against a cluster started with ``cohort up --data-dir DIR``::

    python -m cohort.chaos --data-dir DIR --minutes 30 --seed 1 \\
        --roles server,director,coordinator --pause-duration 3,5

It prints a summary table, writes ``DIR/chaos-report.json`` (checks, fault plan and
records, per-fault unavailability, the full history) and exits 0 if every check held,
1 if one failed, 2 if undecided.  Killed members are restarted by re-running their
command line; those restarted processes are children of the runner and outlive it —
their PIDs are in the report's ``pids`` (``cluster.json`` is not rewritten).
"""
