"""Hypothesis state machine: several lock agents in one process over the in-memory
network (manual delivery: random interleaving across connections, FIFO within one),
with node crashes.  Checked after every step against a single-node reference model:

* safety: no two incompatible locks are held at once (as their holders see them);
* agreement: at quiescence every live handle matches its master's lock table, the
  master's queues are settled (nothing grantable is left waiting), nothing leaks;
* FIFO: a node's later request never overtakes its earlier one on the same resource;
* value blocks: a PR/PW/EX grant reads the last value written, unless marked invalid.
"""

from __future__ import annotations

import random

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from cohort.dlm.agent import H_CONVERTING, H_DONE, H_GRANTED, H_PENDING, Handle, LockAgent
from cohort.dlm.modes import Mode, compatible
from cohort.dlm.resource import GRANTED, NOQUEUE
from cohort.dlm.transport import MemoryNetwork

NODES = ["n0", "n1", "n2", "n3"]
RESOURCES = ["r0", "r1"]
modes = st.sampled_from(list(Mode))


class DlmMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.net = MemoryNetwork(auto=False)
        self.agents: dict[str, LockAgent] = {
            n: LockAgent(n, self.net.transport(n), deadlock_wait=None) for n in NODES
        }
        self.epoch = 1
        for a in self.agents.values():
            a.set_membership(1, {n: "" for n in NODES})
        self.handles: list[Handle] = []
        self.values: dict[str, bytes] = {}  # reference model: last value written
        self.valid: dict[str, bool] = {r: True for r in RESOURCES}
        self.counter = 0
        self.seen_grants: dict[int, int] = {}
        self.crash_count = 0
        self.submitted_epoch: dict[int, int] = {}

    # ------------------------------------------------------------------ helpers
    def live(self) -> list[LockAgent]:
        return [a for n, a in self.agents.items() if n not in self.net.dead]

    def live_handles(self) -> list[Handle]:
        return [
            h for h in self.handles if h.agent.node_id not in self.net.dead and h.state != H_DONE
        ]

    def _track_grants(self) -> None:
        """Value-block check on every new grant or granted conversion."""
        for h in self.live_handles():
            if h.state != H_GRANTED:
                continue
            if self.seen_grants.get(id(h)) == h.token:
                continue
            self.seen_grants[id(h)] = h.token
            assert h.mode is not None
            # one failure never loses the value block's state; two (master and both
            # directory copies) may, which the DLM documents: check up to one crash
            if (
                h.mode >= Mode.PR
                and h.value_valid
                and self.valid.get(h.name, True)
                and self.crash_count <= 1
            ):
                assert h.value == self.values.get(h.name, b""), (
                    h,
                    h.value,
                    self.values.get(h.name),
                )
            if not h.value_valid:
                # value lost: the model forgets it until the next write
                self.valid[h.name] = False

    # ------------------------------------------------------------------ rules
    @rule(
        node=st.sampled_from(NODES),
        res=st.sampled_from(RESOURCES),
        mode=modes,
        noqueue=st.booleans(),
    )
    def request(self, node: str, res: str, mode: Mode, noqueue: bool) -> None:
        a = self.agents[node]
        if node in self.net.dead or a.fenced:
            return
        self.counter += 1
        h = a.submit(res, mode, flags=NOQUEUE if noqueue else 0, owner=self.counter)
        self.submitted_epoch[id(h)] = self.crash_count
        self.handles.append(h)
        self._track_grants()

    @precondition(lambda self: any(h.state == H_GRANTED for h in self.live_handles()))
    @rule(data=st.data(), write=st.booleans())
    def release(self, data: st.DataObject, write: bool) -> None:
        held = [h for h in self.live_handles() if h.state == H_GRANTED]
        h = data.draw(st.sampled_from(held))
        if write and h.mode is not None and h.mode >= Mode.PW:
            self.counter += 1
            v = f"{h.name}:{self.counter}".encode()
            h.set_value(v)
            self.values[h.name] = v
            self.valid[h.name] = True
        h.agent._release(h)
        self._track_grants()

    @precondition(lambda self: any(h.state == H_GRANTED for h in self.live_handles()))
    @rule(data=st.data(), mode=modes, noqueue=st.booleans(), write=st.booleans())
    def convert(self, data: st.DataObject, mode: Mode, noqueue: bool, write: bool) -> None:
        held = [h for h in self.live_handles() if h.state == H_GRANTED]
        h = data.draw(st.sampled_from(held))
        if write and h.mode is not None and h.mode >= Mode.PW:
            self.counter += 1
            v = f"{h.name}:{self.counter}".encode()
            h.set_value(v)
            self.values[h.name] = v
            self.valid[h.name] = True
        h.agent.start_convert(h, mode, NOQUEUE if noqueue else 0)
        if h.error is not None:
            h.error = None
        self._track_grants()

    @precondition(lambda self: any(h.state == H_PENDING for h in self.live_handles()))
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        pend = [h for h in self.live_handles() if h.state == H_PENDING]
        h = data.draw(st.sampled_from(pend))
        h.abandoned = True
        h.agent._cancel(h, "cancelled")
        self._track_grants()

    @rule(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 8))
    def deliver(self, seed: int, n: int) -> None:
        rng = random.Random(seed)
        for _ in range(n):
            if not self.net.deliver_random(rng):
                break
            self._track_grants()
            self.check_safety()

    @precondition(lambda self: len(self.live()) > 2)
    @rule(data=st.data())
    def lose_lease(self, data: st.DataObject) -> None:
        """Self-fencing: every local holder and waiter is told at once; then the
        coordinator removes the node."""
        victim = data.draw(st.sampled_from([a.node_id for a in self.live()]))
        a = self.agents[victim]
        held = [h for h in self.live_handles() if h.agent is a and h.granted]
        mine = [h for h in self.live_handles() if h.agent is a]
        a.lease_lost()
        assert all(h.lost.is_set() for h in held)
        assert all(h.state == H_DONE for h in mine)
        self.crash_node(victim)

    @precondition(lambda self: len(self.live()) > 2)
    @rule(data=st.data())
    def crash(self, data: st.DataObject) -> None:
        victim = data.draw(st.sampled_from([a.node_id for a in self.live()]))
        self.crash_node(victim)

    def crash_node(self, victim: str) -> None:
        self.net.crash(victim)
        self.crash_count += 1
        self.epoch += 1
        members = {a.node_id: "" for a in self.live()}
        for a in self.live():
            a.set_membership(self.epoch, members)
        self._track_grants()

    @rule(seed=st.integers(0, 2**32 - 1))
    def quiesce(self, seed: int) -> None:
        self.net.run_until_idle(random.Random(seed))
        self._track_grants()
        self.check_agreement()

    # ------------------------------------------------------------------ checks
    @invariant()
    def check_safety(self) -> None:
        held = [h for h in self.live_handles() if h.state in (H_GRANTED, H_CONVERTING)]
        for i, x in enumerate(held):
            for y in held[i + 1 :]:
                if x.name != y.name:
                    continue
                assert x.mode is not None and y.mode is not None
                # a converting holder has accepted either mode's protection
                xm = {int(x.mode), x.rqmode}
                ym = {int(y.mode), y.rqmode}
                assert any(compatible(p, q) for p in xm for q in ym), (x, y)

    @invariant()
    def check_fifo(self) -> None:
        by: dict[tuple[str, str], list[Handle]] = {}
        for h in self.handles:
            by.setdefault((h.agent.node_id, h.name), []).append(h)
        for hs in by.values():
            for i, early in enumerate(hs):
                if early.state != H_PENDING or early.abandoned:
                    continue
                if early.agent.node_id in self.net.dead:
                    continue
                for late in hs[i + 1 :]:
                    # a later request granted while the earlier one still waits
                    assert late.state not in (H_GRANTED, H_CONVERTING), (early, late)

    def check_agreement(self) -> None:
        assert not self.net.pending()
        live = {a.node_id for a in self.live()}
        expect: set[tuple[str, int]] = set()
        for h in self.live_handles():
            a = h.agent
            master = self.agents[a.master_of[h.root]] if h.root in a.master_of else None
            assert master is not None and master.node_id in live, h
            lk = master.table.locks.get(h.key)
            assert lk is not None, (h, master.node_id)
            expect.add(h.key)
            if h.state == H_GRANTED:
                assert lk.state == GRANTED and lk.mode == h.mode, (h, lk)
            elif h.state == H_PENDING:
                assert lk.mode == -1, (h, lk)
        for a in self.live():
            for key, lk in a.table.locks.items():
                assert key in expect, ("leaked lock at master", a.node_id, lk)
            # eager grant processing leaves nothing grantable
            from cohort.dlm.resource import Granted

            evs = a.table.settle(list(a.table.resources))
            assert not [e for e in evs if isinstance(e, Granted)]


TestDlm = DlmMachine.TestCase
TestDlm.settings = settings(
    max_examples=30,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
