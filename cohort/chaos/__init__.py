"""Jepsen-style fault injection for Cohort: histories, checkers, nemeses and a runner.

Everything here except :mod:`cohort.chaos.runner` works without a running cluster:

* :mod:`cohort.chaos.history` — the recorded operations (``Op``, ``History``, ``Recorder``).
* :mod:`cohort.chaos.linearizability` — a WGL/Lowe checker for per-key registers.
* :mod:`cohort.chaos.lock_check` — DLM lock safety, fencing and single-owner checks.
* :mod:`cohort.chaos.proxy` — a fault-injecting TCP proxy.
* :mod:`cohort.chaos.faulty_store` — a fault-injecting ``Store`` wrapper.
* :mod:`cohort.chaos.nemesis` — seeded schedules of process and network faults.
"""
