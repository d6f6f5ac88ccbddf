"""The heartbeat, the replicas' queue and relay, and the SIGTERM handler, on a real TCPStore (the
job's rendezvous store) in this process: the parts of a dying or stuck job that a launcher run
cannot reach on purpose."""
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from runtime.distributed.heartbeat import Heartbeat
from runtime.distributed.replicas import ResultRelay, SharedQueue
from runtime.distributed.world import Layout, World
from runtime.engine.sequence import Request

ROOT = Path(__file__).resolve().parents[1]
PAIR = Layout(("a", "b"), ((0,), (1,)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def store():
    return dist.TCPStore("127.0.0.1", free_port(), 1, True, timeout=timedelta(seconds=10))


def world(rank: int, layout: Layout = PAIR) -> World:
    return World(layout, rank, layout.member_of(rank), [], None, torch.device("cpu"))


def wait_for(found: list, seconds: float = 20.0):
    deadline = time.monotonic() + seconds
    while not found and time.monotonic() < deadline:
        time.sleep(0.05)
    return found


def stepping(hb: Heartbeat, step: int, waited: float):
    """The state of a rank `waited` seconds into `step` (the beat thread posts it)."""
    hb.step, hb.position = step, 2 * len(Heartbeat.PHASES) * step + 1
    hb.since = time.monotonic() - waited


def test_a_failure_of_the_heartbeat_itself_is_named_not_taken_for_an_unreachable_store(store):
    """A value the beat thread cannot read (here a position that is not a number) stops the
    job with the error as it is, not with "rank 0 is unreachable"."""
    store.set("deepen/at/1", "not a number")
    store.set("deepen/beat/1", "1")
    said = []
    hb = Heartbeat(world(0), every=0.05, step_timeout=1.0, on_dead=said.append, store=store)
    stepping(hb, 5, 10.0)
    assert wait_for(said), "the heartbeat said nothing"
    hb.close()
    assert "ValueError" in said[0] and "unreachable" not in said[0], said


def test_a_store_whose_host_is_gone_is_reported_unreachable():
    port = free_port()
    host = subprocess.Popen([sys.executable, "-c", "import time, torch.distributed as d; from datetime import timedelta; "
                             f"s = d.TCPStore('127.0.0.1', {port}, 2, True, timeout=timedelta(seconds=60)); time.sleep(120)"])
    try:
        client = dist.TCPStore("127.0.0.1", port, 2, False, timeout=timedelta(seconds=30))
        said = []
        hb = Heartbeat(world(1), every=0.05, on_dead=said.append, store=client)
        host.kill()
        assert wait_for(said), "the heartbeat said nothing"
        assert "rank 0 (member 'a', leader) is unreachable" in said[0], said
        hb.stop.set()
    finally:
        host.kill()
        host.wait()


def test_a_rank_done_stepping_is_not_stuck_and_done_ranks_are_left_out(store):
    """Rank 0 waiting for the other replicas' last rows (`rest`) is not stuck, however long; a
    rank that waits on ranks which all said they are done is not stuck either; one that waits on
    a rank still stepping is."""
    hb = Heartbeat(world(0), every=10, step_timeout=1.0, store=store)
    store.set("deepen/at/1", str(2 * len(Heartbeat.PHASES) * 5 + 1))
    stepping(hb, 5, 30.0)
    assert "every rank is still working after 'plan' of step 5" in hb.stuck()
    hb.rest()
    assert hb.stuck() == ""
    hb.resting = False
    store.set("deepen/done/1", "1")
    assert hb.stuck() == ""
    hb.stop.set()


def test_each_micro_batchs_first_steps_fall_under_the_start_up_timeout(store):
    hb = Heartbeat(world(0), every=10, step_timeout=1.0, store=store)
    store.set("deepen/at/1", str(2 * len(Heartbeat.PHASES) * 6))
    hb.warmup = 4   # two micro-batches: each one's first step and first forward pass
    stepping(hb, 3, 30.0)
    assert hb.stuck() == ""
    stepping(hb, 4, 30.0)
    assert "has not finished" in hb.stuck() or "still working" in hb.stuck()
    hb.stop.set()


def test_publishing_a_large_input_lets_the_heartbeat_beat_and_the_roots_take_it_all(store):
    """rank 0 publishes while its beat thread needs the same lock: the thread gets it between
    store calls (before: not once until the whole input was published). Two roots then take
    every request once, in order."""
    lock = threading.RLock()
    queue = SharedQueue(store, lock)
    requests = [Request(i, f"prompt {i}", 4) for i in range(3000)]
    publishing, done, beats = threading.Event(), threading.Event(), []

    def beat():
        while not done.is_set():
            with lock:
                if publishing.is_set():
                    beats.append(1)
            time.sleep(0)
    thread = threading.Thread(target=beat)
    thread.start()
    publishing.set()
    queue.publish(requests)
    publishing.clear()
    done.set()
    thread.join()
    assert beats, "the lock was held for the whole publish"
    roots = [SharedQueue(store, threading.RLock()) for _ in range(2)]
    taken = []
    while True:
        got = roots[len(taken) % 2].take(7)
        if not got:
            break
        taken += got
    assert [r.id for r in taken] == list(range(3000)) and taken[2999].prompt == "prompt 2999"


class DiesAfter:
    """A store that stops answering after `calls` operations: a sender killed between its two
    store calls. A mock, because no test can kill a process between two calls of its own."""

    def __init__(self, store, calls: int):
        self.store, self.calls = store, calls

    def __getattr__(self, name):
        def call(*args):
            if self.calls == 0:
                raise SystemExit("killed")
            self.calls -= 1
            return getattr(self.store, name)(*args)
        return call


def test_a_sender_that_dies_while_posting_holds_back_no_later_record(store):
    lock = threading.RLock()
    receiver = ResultRelay(store, lock, 0, [2, 4])
    dying = ResultRelay(DiesAfter(store, 1), lock, 2, [])
    with pytest.raises(SystemExit):
        dying.send({"id": "lost"})
    ResultRelay(store, lock, 4, []).send({"id": "late"})
    assert [r["id"] for r in receiver.receive()] == ["late"]


HOLDS_THE_LOCK = """
import os, signal, sys, time, torch, torch.distributed as dist
from datetime import timedelta
sys.path.insert(0, {root!r})
from runtime.distributed.heartbeat import Heartbeat
from runtime.distributed.rank import install_sigterm
from runtime.distributed.world import Layout, World
layout = Layout(("a",), ((0,),))
w = World(layout, 0, 0, [], None, torch.device("cpu"))
hb = Heartbeat(w, store=dist.TCPStore("127.0.0.1", {port}, 1, True, timeout=timedelta(seconds=10)))
signals = install_sigterm(w, hb)
with hb.lock:   # the main thread in the middle of a store call (a queue take, a relay post)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(60)
"""


def test_sigterm_while_the_main_thread_holds_the_heartbeat_lock_stops_the_rank():
    """The launcher's SIGTERM arrives while the main thread holds the heartbeat's lock: the
    handler names the rank and exits (before: it waited on that lock forever, until SIGKILL)."""
    proc = subprocess.run([sys.executable, "-c", HOLDS_THE_LOCK.format(root=str(ROOT), port=free_port())],
                          capture_output=True, text=True, timeout=50)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "deepen: rank 0 (member 'a', leader): stopped by the launcher" in proc.stderr
