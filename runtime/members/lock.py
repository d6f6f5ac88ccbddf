"""A lock on a cache directory, safe when several processes prepare it at once: the ranks of one
host, or several hosts sharing the directory over a network file system.

`os.mkdir` is atomic on local and network file systems (NFS included), where flock/fcntl locks
are not always honoured, so the lock is a directory. Its holder rewrites an owner file inside it
every `refresh` seconds (host, pid, a counter). A waiter breaks the lock when the owner is a dead
process on its own host, or when the owner file has not changed for `stale` seconds of the
waiter's own clock (hosts' clocks differ: it compares contents, never times)."""
from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path

OWNER = "owner.json"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class CacheLock:
    """`with CacheLock(path): ...`; `timeout`: seconds to wait before a TimeoutError that names
    the holder; `log(message)` is told once when the lock is busy."""

    def __init__(self, path: str | Path, timeout: float = 3600.0, stale: float = 60.0, refresh: float = 5.0,
                 poll: float = 0.2, log=None):
        self.path = Path(path)
        self.timeout, self.stale, self.refresh, self.poll = timeout, stale, refresh, poll
        self.log = log
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "id": uuid.uuid4().hex, "beat": 0}
        self._stop = threading.Event()
        self._thread = None

    def owner(self) -> dict | None:
        try:
            return json.loads((self.path / OWNER).read_text())
        except (OSError, ValueError):
            return None   # not written yet, or being replaced

    def _write_owner(self):
        tmp = self.path / f".{OWNER}.{self.me['id']}"
        tmp.write_text(json.dumps(self.me))
        os.replace(tmp, self.path / OWNER)

    def _keep_fresh(self):
        while not self._stop.wait(self.refresh):
            self.me["beat"] += 1
            try:
                self._write_owner()
            except OSError:
                return

    def _break(self):
        """Move the stale lock aside (atomic: of several breakers one wins) and remove it."""
        aside = self.path.with_name(f"{self.path.name}.broken-{uuid.uuid4().hex}")
        try:
            os.rename(self.path, aside)
        except OSError:
            return
        shutil.rmtree(aside, ignore_errors=True)

    def acquire(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        seen, since, told = None, start, False
        while True:
            try:
                os.mkdir(self.path)
            except FileExistsError:
                pass
            else:
                self._write_owner()
                self._thread = threading.Thread(target=self._keep_fresh, daemon=True)
                self._thread.start()
                return self
            now = time.monotonic()
            owner = self.owner()
            if owner != seen:
                seen, since = owner, now
            if owner and owner.get("host") == self.me["host"] and not _alive(int(owner.get("pid", 0))):
                self._break()        # its holder died on this host
                continue
            if now - since > self.stale:
                self._break()        # nobody has refreshed it (a holder on another host died)
                continue
            who = f"pid {owner['pid']} on {owner['host']}" if owner else "another process"
            if now - start > self.timeout:
                raise TimeoutError(f"{self.path} has been held by {who} for over {self.timeout:g} s; "
                                   f"if nothing is preparing there, remove it")
            if not told and self.log is not None:
                self.log(f"waiting for {who}, which holds {self.path}")
                told = True
            time.sleep(self.poll)

    def release(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if (self.owner() or {}).get("id") == self.me["id"]:
            shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
