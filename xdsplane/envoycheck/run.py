"""Running Envoy: finding the binary, one ``--mode validate`` run, ``EnvoyChecker``."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from xdsplane.envoycheck.bootstrap import Trial, bootstrap_json
from xdsplane.envoycheck.messages import clean_message
from xdsplane.envoycheck.narrow import Narrowing, Outcome, Rejection, for_each_group
from xdsplane.snapshot import Snapshot, SnapshotSet

TIMEOUT = 60.0  # seconds one ``envoy --mode validate`` may take


def find_envoy(explicit: str | None = None) -> str | None:
    """The Envoy binary: ``explicit`` if given, else ``envoy`` on PATH or beside this Python.

    Never ``import envoy`` to find it: that name is the xds-protos package.
    """
    if explicit:
        return shutil.which(explicit) or None
    here = str(Path(sys.executable).parent)
    return shutil.which("envoy", path=os.pathsep.join([os.environ.get("PATH", ""), here]))


def envoy_argv(binary: str, config: str) -> list[str]:
    return [
        binary,
        "--mode",
        "validate",
        "-c",
        config,
        "--disable-hot-restart",
        "--concurrency",
        "1",
        "-l",
        "error",
        "--log-format",
        "%v",
    ]


def _write_config(folder: str, text: str) -> str:
    path = os.path.join(folder, "bootstrap.json")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def _outcome(returncode: int, output: bytes) -> Outcome:
    text = output.decode("utf-8", errors="replace")
    if returncode == 0:
        return Outcome(True)
    message = clean_message(text, returncode)
    if returncode < 0:  # killed by a signal: a crash is not a verdict
        return Outcome(False, f"envoy died (signal {-returncode}): {message}", broken=True)
    if not text.strip():  # Envoy always says why it rejects a config
        return Outcome(False, f"exited with code {returncode} and said nothing", broken=True)
    return Outcome(False, message)


@dataclass
class EnvoyChecker:
    """Checks snapshot sets with a real Envoy; remembers which snapshot digests passed.

    ``check`` runs Envoy with ``subprocess``; ``acheck`` (the Reloader's ``validator``) with
    ``asyncio``. Both return one line per rejection, ``[]`` when Envoy accepts everything.
    """

    binary: str
    timeout: float = TIMEOUT
    label: str = "<snapshot>"  # where a rejection that names no resource is reported
    runs: int = 0  # Envoy processes started, for tests and logs
    _passed: OrderedDict[str, None] = field(default_factory=OrderedDict)

    def _remember(self, digest: str) -> None:
        self._passed[digest] = None
        self._passed.move_to_end(digest)
        while len(self._passed) > 256:
            self._passed.popitem(last=False)

    def _todo(self, snapshots: SnapshotSet) -> list[tuple[list[str], Snapshot]]:
        """The snapshots not known to pass, each once, with the names of their groups."""
        todo: dict[str, tuple[list[str], Snapshot]] = {}
        for g in snapshots.groups:
            if g.snapshot.digest in self._passed:
                self._passed.move_to_end(g.snapshot.digest)
            else:
                todo.setdefault(g.snapshot.digest, ([], g.snapshot))[0].append(g.name)
        return list(todo.values())

    def _settle(self, n: Narrowing) -> Rejection | None:
        self.runs += n.runs
        if n.rejection is None:
            self._remember(n.snapshot.digest)
        return n.rejection

    def _format(self, snapshots: SnapshotSet, rejections: Iterable[Rejection]) -> list[str]:
        """One line per distinct rejection, naming the node groups when there are several."""
        several = len(snapshots.groups) > 1
        same: dict[tuple[str, str, bool], list[Rejection]] = {}
        for rej in rejections:
            r = rej.resource
            key = (
                f"{r.type}/{r.name}/{r.source}" if r is not None else "",
                rej.message,
                rej.broken,
            )
            same.setdefault(key, []).append(rej)
        return [
            found[0].describe(self.label, "; ".join(x.group for x in found) if several else "")
            for found in same.values()
        ]

    def _start(self, snapshot: Snapshot, trial: Trial, folder: str) -> str | Outcome:
        """The bootstrap's path, or the Outcome when it cannot even be written."""
        try:
            text = bootstrap_json(snapshot, trial)
            path = _write_config(folder, text)
        except Exception as e:  # e.g. an Any whose type this Python cannot render
            return Outcome(False, f"cannot write a bootstrap: {type(e).__name__}: {e}", broken=True)
        return path

    # -- blocking --------------------------------------------------------------------------

    def _run(self, snapshot: Snapshot, trial: Trial) -> Outcome:
        with tempfile.TemporaryDirectory(prefix="xdsplane-envoy-") as folder:
            config = self._start(snapshot, trial, folder)
            if isinstance(config, Outcome):
                return config
            try:
                done = subprocess.run(
                    envoy_argv(self.binary, config),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    timeout=self.timeout,
                    check=False,
                )
            except subprocess.TimeoutExpired:  # run() has killed and reaped it
                return Outcome(False, f"no verdict within {self.timeout:g}s", broken=True)
            except OSError as e:
                return Outcome(False, f"cannot run {self.binary}: {e}", broken=True)
        return _outcome(done.returncode, done.stdout)

    def check_group(self, group: str, snapshot: Snapshot) -> Rejection | None:
        n = Narrowing(group, snapshot)
        while n.trial is not None:
            n.feed(self._run(snapshot, n.trial))
        return self._settle(n)

    def check(self, snapshots: SnapshotSet) -> list[str]:
        rejections = []
        for names, snapshot in self._todo(snapshots):
            rej = self.check_group(names[0], snapshot)
            rejections.extend(for_each_group(rej, names))
        return self._format(snapshots, rejections)

    # -- asyncio ---------------------------------------------------------------------------

    async def _arun(self, snapshot: Snapshot, trial: Trial) -> Outcome:
        with tempfile.TemporaryDirectory(prefix="xdsplane-envoy-") as folder:
            config = self._start(snapshot, trial, folder)
            if isinstance(config, Outcome):
                return config
            try:
                proc = await asyncio.create_subprocess_exec(
                    *envoy_argv(self.binary, config),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.STDOUT,
                )
            except OSError as e:
                return Outcome(False, f"cannot run {self.binary}: {e}", broken=True)
            try:
                output, _ = await asyncio.wait_for(proc.communicate(), self.timeout)
            except TimeoutError:
                return Outcome(False, f"no verdict within {self.timeout:g}s", broken=True)
            finally:
                if proc.returncode is None:  # timed out or cancelled: stop it by its PID
                    proc.kill()
                    await proc.wait()
        return _outcome(proc.returncode if proc.returncode is not None else -9, output)

    async def acheck_group(self, group: str, snapshot: Snapshot) -> Rejection | None:
        n = Narrowing(group, snapshot)
        while n.trial is not None:
            n.feed(await self._arun(snapshot, n.trial))
        return self._settle(n)

    async def acheck(self, snapshots: SnapshotSet) -> list[str]:
        """The Reloader's ``validator``: problems that keep ``snapshots`` from being served."""
        rejections = []
        for names, snapshot in self._todo(snapshots):
            rej = await self.acheck_group(names[0], snapshot)
            rejections.extend(for_each_group(rej, names))
        return self._format(snapshots, rejections)
