"""The lock agent over the in-memory transport: message counts, semantics, failures."""

from __future__ import annotations

import asyncio

import pytest
from dlm_helpers import make_cluster, poll, settle

from cohort.dlm.agent import LockAgent, rendezvous
from cohort.dlm.errors import DeadlockError, LockLost, LockTimeout, NotQueued, UsageError
from cohort.dlm.modes import Mode
from cohort.dlm.transport import MemoryNetwork

EX, PR, PW, NL, CR = Mode.EX, Mode.PR, Mode.PW, Mode.NL, Mode.CR


def name_with(directory: str, not_: str | None, members: list[str], prefix: str = "r") -> str:
    """A resource name whose directory node is ``directory``."""
    for i in range(10_000):
        n = f"{prefix}{i}"
        if rendezvous(n, sorted(members)) == directory:
            return n
    raise AssertionError


async def test_standalone_agent_works_without_membership() -> None:
    a = LockAgent("solo", MemoryNetwork().transport("solo"))
    async with a.lock("x", EX) as h:
        assert h.token > 0 and h.mode is EX


async def test_message_pattern() -> None:
    net, (a, b, c) = make_cluster(3)
    await settle(net)
    members = ["n0", "n1", "n2"]
    r = name_with("n2", None, members)  # directory is c
    net.reset_counters()
    h = await a.lock(r, EX)  # first locker: lookup at c (2 msgs), becomes master
    await settle(net)
    # + one one-way copy of the new directory entry to the backup directory node
    assert net.messages == 2 + 1
    assert net.by_opcode[18] == 1
    await h.release()
    await settle(net)
    assert net.messages == 3  # release on own master: 0
    net.reset_counters()
    for _ in range(10):  # local master: zero messages
        async with a.lock(r, PR):
            pass
    assert net.messages == 0
    # b: first lock on a resource mastered elsewhere: lookup + request = 4
    net.reset_counters()
    hb = await b.lock(r, PR)
    assert net.messages == 4
    net.reset_counters()
    await hb.release()
    await settle(net)
    assert net.messages == 1  # release = 1 message to the master
    net.reset_counters()
    hb = await b.lock(r, PR)  # later lock: 1 request/response
    assert net.messages == 2
    net.reset_counters()
    await hb.convert(NL)  # conversion: 1 request/response
    assert net.messages == 2
    await hb.release()
    await settle(net)
    # directory node's own first lock costs no lookup message
    net.reset_counters()
    r2 = name_with("n2", None, members, prefix="s")
    h = await c.lock(r2, EX)
    assert net.messages == 1 and net.by_opcode[18] == 1  # the backup copy only
    await h.release()
    assert net.max_message <= 64


async def test_exclusion_and_fifo_across_nodes() -> None:
    _net, agents = make_cluster(3)
    order: list[str] = []
    inside = 0

    async def worker(a: LockAgent, tag: str) -> None:
        nonlocal inside
        for _ in range(20):
            async with a.lock("shared", EX):
                inside += 1
                assert inside == 1
                order.append(tag)
                await asyncio.sleep(0)
                inside -= 1

    await asyncio.gather(*(worker(a, a.node_id) for a in agents))
    assert len(order) == 60


async def test_blocking_notification_and_value_block_handover() -> None:
    _net, (a, b, _) = make_cluster(3)
    seen: list[Mode] = []
    h = await a.lock("partition/1", EX, on_blocking=seen.append)
    h.set_value(b"seq=41")
    task = asyncio.create_task(b.lock("partition/1", EX))
    await poll(lambda: seen == [EX])
    assert not task.done()
    await h.release()
    hb = await task
    assert hb.value == b"seq=41" and hb.value_valid and hb.token > h.token
    assert hb.previous_holder_died is None


async def test_noqueue_timeout_and_convert() -> None:
    net, (a, b) = make_cluster(2)
    h = await a.lock("x", PR)
    with pytest.raises(NotQueued):
        await b.lock("x", EX, noqueue=True)
    with pytest.raises(LockTimeout):
        await b.lock("x", EX, timeout=0.05)
    hb = await b.lock("x", PR)
    # conversion deadlock-free case: a converts up while b holds PR -> waits; b releases
    t = asyncio.create_task(h.convert(EX))
    await settle(net)
    assert not t.done()
    await hb.release()
    await t
    assert h.mode is EX
    await h.convert(NL)
    assert h.mode is NL
    hb = await b.lock("x", EX)
    await hb.release()
    await h.release()
    await settle(net)
    assert not a.table.locks and not b.table.locks


async def test_conversion_timeout_keeps_old_mode() -> None:
    _net, (a, b) = make_cluster(2)
    h1 = await a.lock("y", PR)
    h2 = await b.lock("y", PR)
    with pytest.raises(LockTimeout):
        await h2.convert(EX, timeout=0.05)
    assert h2.mode is PR and h2.granted
    await h1.release()
    await h2.release()


async def test_conversion_deadlock_one_victim() -> None:
    _net, (a, b, _) = make_cluster(3, deadlock_wait=0.05)
    h1 = await a.lock("z", PR)
    h2 = await b.lock("z", PR)
    t1 = asyncio.create_task(h1.convert(EX))
    t2 = asyncio.create_task(h2.convert(EX))
    done, pending = await asyncio.wait({t1, t2}, timeout=5, return_when=asyncio.FIRST_COMPLETED)
    assert len(done) == 1 and len(pending) == 1
    (victim_task,) = done
    with pytest.raises(DeadlockError):
        victim_task.result()
    loser, winner_task = (h1, t2) if victim_task is t1 else (h2, t1)
    winner = h2 if loser is h1 else h1
    assert loser.mode is PR  # the victim keeps its old mode
    await loser.release()
    await asyncio.wait_for(winner_task, 5)
    assert winner.mode is EX
    await winner.release()
    assert a.stats["deadlocks"] + b.stats["deadlocks"] >= 1


async def test_two_resource_deadlock_across_nodes() -> None:
    _net, (a, b, _c) = make_cluster(3, deadlock_wait=0.05)
    # deadlocks are between owners (default: the asyncio task); name them here
    ha = await a.lock("A", EX, owner="tx1")
    hb = await b.lock("B", EX, owner="tx2")
    ta = asyncio.create_task(a.lock("B", EX, owner="tx1"))
    tb = asyncio.create_task(b.lock("A", EX, owner="tx2"))
    done, _pending = await asyncio.wait({ta, tb}, timeout=5, return_when=asyncio.FIRST_COMPLETED)
    assert len(done) == 1
    (victim,) = done
    with pytest.raises(DeadlockError):
        victim.result()
    # the victim's owner releases what it holds; the other proceeds
    if victim is ta:
        await ha.release()
        got = await asyncio.wait_for(tb, 5)
    else:
        await hb.release()
        got = await asyncio.wait_for(ta, 5)
    assert got.granted


async def test_parent_child_and_ranges() -> None:
    net, (a, b) = make_cluster(2)
    f = await a.lock("file", CR)
    fb = await b.lock("file", CR)
    net.reset_counters()
    r1 = await f.lock("rec1", EX)
    r2 = await fb.lock("rec2", EX)  # other child, no conflict, no directory lookup
    assert net.by_opcode[1] == 0
    with pytest.raises(NotQueued):
        await fb.lock("rec1", PR, noqueue=True)
    with pytest.raises(UsageError):
        await f.release()  # has a child
    await r1.release()
    await r2.release()
    x = await a.lock("bytes", EX, range=(0, 100))
    y = await b.lock("bytes", EX, range=(100, 200))
    with pytest.raises(NotQueued):
        await b.lock("bytes", PR, range=(50, 60), noqueue=True)
    await x.release()
    await y.release()
    await f.release()
    await fb.release()


async def test_node_death_invalidates_value_and_reports_dead_holder() -> None:
    net, (a, b, c) = make_cluster(3)
    h0 = await a.lock("partition/7", EX)
    h0.set_value(b"v1")
    await h0.release()
    hb = await b.lock("partition/7", EX)  # b holds EX at master a
    waiter = asyncio.create_task(c.lock("partition/7", EX))
    await settle(net)
    assert not waiter.done()
    net.crash("n1")
    for ag in (a, c):
        ag.set_membership(2, {"n0": "", "n2": ""})
    hc = await asyncio.wait_for(waiter, 2)
    assert hc.previous_holder_died == "n1" and not hc.value_valid
    assert hc.token > hb.token


async def test_master_death_recovers_on_survivors() -> None:
    net, (a, b, c) = make_cluster(3)
    ha = await a.lock("q", EX)  # a masters q and holds EX
    hb_pr = asyncio.create_task(b.lock("q", PR))
    hc_nl = await c.lock("q", NL)
    await settle(net)
    net.crash("n0")
    for ag in (b, c):
        ag.set_membership(2, {"n1": "", "n2": ""})
    hb = await asyncio.wait_for(hb_pr, 2)
    # a (the dead master) may have held PW/EX: value invalid, dead holder reported
    assert hb.previous_holder_died == "n0" and not hb.value_valid
    assert hb.token >= 2 << 32 and hb.token > ha.token
    assert hc_nl.granted
    # and new locks work in the new epoch
    h2 = await asyncio.wait_for(c.lock("q", CR), 2)
    await h2.release()
    t = asyncio.create_task(c.lock("q2", EX))
    assert (await asyncio.wait_for(t, 2)).granted


async def test_lease_lost_tells_holders_and_waiters() -> None:
    net, (a, b) = make_cluster(2)
    # b is the directory of p: it remembers that a mastered p after a is gone (if the
    # master and the directory die together, only holders of locks on p would know)
    p = name_with("n1", None, ["n0", "n1"], prefix="p")
    h = await a.lock(p, EX)
    t = asyncio.create_task(a.lock(p, EX))
    await settle(net)
    a.lease_lost()
    assert h.lost.is_set() and not h.granted
    with pytest.raises(LockLost):
        await t
    with pytest.raises(LockLost):
        h.check()
    with pytest.raises(LockLost):
        await a.lock("other", EX)
    # the cluster removes a; b can take the lock; a rejoins later
    net.crash("n0")
    b.set_membership(2, {"n1": ""})
    hb = await asyncio.wait_for(b.lock(p, EX), 2)
    assert hb.previous_holder_died == "n0"


async def test_join_moves_directory_but_keeps_mastership() -> None:
    net, (a, b) = make_cluster(2)
    h = await a.lock("keep", EX)
    c = LockAgent("n2", net.transport("n2"))
    for ag in (a, b, c):
        ag.set_membership(2, {"n0": "", "n1": "", "n2": ""})
    t = asyncio.create_task(c.lock("keep", PR))
    await settle(net)
    assert not t.done()
    await h.release()
    hc = await asyncio.wait_for(t, 2)
    assert hc.value_valid and hc.previous_holder_died is None


async def test_cancelled_after_grant_gives_the_lock_back() -> None:
    """A caller cancelled in the instant between the grant and its resumption never sees
    the handle; the agent must release that lock or it is held forever."""
    import asyncio as aio

    from cohort.dlm import LockAgent, MemoryNetwork, Mode

    net = MemoryNetwork()
    a, b = LockAgent("a", net.transport("a")), LockAgent("b", net.transport("b"))
    for x in (a, b):
        x.set_membership(1, {"a": "", "b": ""})
    holder = await a.lock("r", Mode.EX)
    waiter = aio.ensure_future(b.lock("r", Mode.EX))
    await aio.sleep(0.05)  # b's request is queued behind a's lock
    await holder.release()
    # let the grant reach b's future, then cancel b's task before it resumes
    for _ in range(50):
        h = next(iter(b.handles.values()), None)
        if h is not None and h._fut is not None and h._fut.done():
            break
        await aio.sleep(0)
    waiter.cancel()
    with __import__("contextlib").suppress(aio.CancelledError):
        await waiter
    again = await aio.wait_for(a.lock("r", Mode.EX), 2)  # would hang if b leaked it
    await again.release()


async def test_no_grant_once_the_membership_lease_may_have_expired() -> None:
    """Regression (30-minute chaos run): a master paused past its lease granted a lock
    the moment it woke, before its lease keeper ran, while a new master had granted the
    same lock meanwhile.  With ``lease_valid`` the agent checks before every grant and
    fences itself instead."""
    valid = [True]
    net = MemoryNetwork()
    a = LockAgent("a", net.transport("a"), lease_valid=lambda: valid[0])
    b = LockAgent("b", net.transport("b"))
    members = {"a": "", "b": ""}
    for ag in (a, b):
        ag.set_membership(1, members)
    await settle(net)
    h = await a.lock("r", EX)  # a masters r
    waiter = asyncio.create_task(a.lock("r", EX))
    await asyncio.sleep(0)
    valid[0] = False  # the lease runs out (a SIGSTOP, say) while a holds r and one waits
    await h.release()  # the release would grant r to the waiter: it must not
    with pytest.raises(LockLost):
        await asyncio.wait_for(waiter, 5)
    assert a.fenced
    with pytest.raises(LockLost):
        await a.lock("other", EX)


async def test_no_fast_path_grant_once_the_lease_may_have_expired() -> None:
    """The zero-message fast path (an idle resource this agent masters) checks the lease
    too: the 10-minute chaos run after the first fix still saw a paused master grant
    within 7 ms of waking, through this path."""
    valid = [True]
    net = MemoryNetwork()
    a = LockAgent("a", net.transport("a"), lease_valid=lambda: valid[0])
    a.set_membership(1, {"a": ""})
    h = await a.lock("r", EX)
    await h.release()  # r is idle, mastered here: the next lock is granted locally
    valid[0] = False
    with pytest.raises(LockLost):
        await a.lock("r", EX)
    assert a.fenced
