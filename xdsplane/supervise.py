"""Keep child processes running: restart each one that exits, with backoff, and say so.

``xdsplane up`` starts the control plane, the guard and Envoy through a ``Supervisor``.
Nothing here blocks: the caller's loop calls ``poll()`` (which notices exits and starts what
is due) and, when it is told to stop, ``stop()``. A restart that is waiting out its delay is
only a time in the future, so stopping during a backoff has nothing to interrupt.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Backoff:
    """The delay before restart n is ``first * 2**(n-1)``, at most ``cap``; a process that
    ran for ``reset_after`` seconds or more before it exited starts again at ``first``."""

    first: float = 0.5
    cap: float = 10.0
    reset_after: float = 30.0

    def delay(self, previous: float | None, ran_for: float) -> float:
        if previous is None or ran_for >= self.reset_after:
            return self.first
        return min(previous * 2, self.cap)


def describe_exit(returncode: int) -> str:
    """``exited with code 1`` or ``was killed by SIGKILL``."""
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


def _say(message: str) -> None:
    print(f"xdsplane up: {message}", file=sys.stderr, flush=True)


@dataclass(eq=False)
class Child:
    """One supervised process: how to start it, and where it is in its life."""

    name: str
    argv: list[str]
    log: Path | None = None  # stdout and stderr appended here (else inherited)
    ready: Callable[[], bool] | None = None  # answers once a restarted process serves again
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restarts: int = 0
    delay: float | None = None  # the last backoff used
    restart_at: float | None = None  # a restart is due then (the process is gone)
    waiting_ready: bool = False

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None


@dataclass
class Supervisor:
    backoff: Backoff = field(default_factory=Backoff)
    say: Callable[[str], None] = _say
    clock: Callable[[], float] = time.monotonic
    children: list[Child] = field(default_factory=list)
    stopping: bool = False  # set from a signal handler: exits from now on are expected

    def request_stop(self) -> None:
        """Note that everything is about to stop (safe in a signal handler): a Ctrl-C in a
        terminal reaches the children too, and their exits are then not restarted."""
        self.stopping = True

    def start(
        self,
        name: str,
        argv: Sequence[str],
        log: Path | None = None,
        ready: Callable[[], bool] | None = None,
    ) -> Child:
        """Start ``argv`` now and keep it running from then on (once ``poll`` is called)."""
        child = Child(name, list(argv), log, ready)
        self.children.append(child)
        self._spawn(child)
        return child

    def _spawn(self, child: Child) -> None:
        if child.log is None:
            child.proc = subprocess.Popen(child.argv)
        else:
            with open(child.log, "ab") as out:
                child.proc = subprocess.Popen(child.argv, stdout=out, stderr=subprocess.STDOUT)
        child.started_at = self.clock()
        child.restart_at = None

    def exited(self) -> list[Child]:
        """The children whose process has exited and is not restarted yet."""
        return [c for c in self.children if c.proc is not None and c.proc.poll() is not None]

    def poll(self) -> None:
        """Notice processes that exited (schedule their restart) and start those now due."""
        now = self.clock()
        for child in self.children:
            if self.stopping:
                return
            proc = child.proc
            if proc is not None and proc.poll() is not None:
                ran_for = now - child.started_at
                child.delay = self.backoff.delay(child.delay, ran_for)
                child.restart_at = now + child.delay
                child.proc = None
                self.say(
                    f"{child.name} (pid {proc.pid}) {describe_exit(proc.returncode)} after "
                    f"{ran_for:.1f} s; restarting it in {child.delay:.1f} s"
                )
            elif child.restart_at is not None and now >= child.restart_at:
                child.restarts += 1
                try:
                    self._spawn(child)
                except OSError as e:
                    child.delay = self.backoff.delay(child.delay, 0.0)
                    child.restart_at = now + child.delay
                    self.say(
                        f"could not start {child.name} ({e.strerror}); "
                        f"trying again in {child.delay:.1f} s"
                    )
                    continue
                child.waiting_ready = child.ready is not None
                self.say(f"{child.name} restarted (pid {child.pid}, restart {child.restarts})")
            elif child.waiting_ready and child.ready is not None and child.ready():
                child.waiting_ready = False
                self.say(f"{child.name} (pid {child.pid}) is serving again")

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel pending restarts and stop every process, last started first: SIGTERM,
        then SIGKILL for one that is still there after ``timeout`` seconds."""
        self.stopping = True
        for child in self.children:
            child.restart_at = None
        for child in reversed(self.children):
            proc, child.proc = child.proc, None
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.say(
                    f"{child.name} (pid {proc.pid}) did not stop in {timeout:.0f} s; killing it"
                )
                proc.kill()
                proc.wait(timeout=5)
