"""The current snapshots, and the streams waiting to hear that theirs changed.

Publishing never blocks: a watch's ``notify`` only marks its stream as having work to do
(the stream picks the snapshot up itself), so one slow Envoy cannot hold back the others.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from xdsplane.snapshot import NodeGroup, Snapshot, SnapshotSet


@dataclass(eq=False, slots=True)
class Watch:
    """A stream's interest in its node's snapshot. ``cluster`` is what selects besides the
    node id, fixed for the stream's life (None: the node id alone, as over mTLS without a
    proven cluster), so a reload re-selects by exactly what the stream was admitted with."""

    node_id: str
    cluster: str | None
    notify: Callable[[], None]
    digest: str = ""


@dataclass
class SnapshotCache:
    _current: SnapshotSet | None = None
    _watches: set[Watch] = field(default_factory=set)
    _groups: dict[tuple[str, str | None], NodeGroup | None] = field(default_factory=dict)

    @property
    def current(self) -> SnapshotSet | None:
        return self._current

    def group_for(self, node_id: str, cluster: str | None) -> NodeGroup | None:
        if self._current is None:
            return None
        key = (node_id, cluster)
        if key not in self._groups:
            if len(self._groups) > 100_000:
                self._groups.clear()
            self._groups[key] = self._current.group_for(node_id, cluster)
        return self._groups[key]

    def lookup(self, node_id: str, cluster: str | None) -> Snapshot | None:
        group = self.group_for(node_id, cluster)
        return group.snapshot if group is not None else None

    def update(self, snapshots: SnapshotSet) -> list[Watch]:
        """Make ``snapshots`` current; returns the watches whose snapshot changed. Each
        snapshot is stamped with its install time first (``Snapshot.installed_at``)."""
        now = time.monotonic()
        for g in snapshots.groups:
            g.snapshot.mark_installed(now)
        self._current = snapshots
        self._groups = {}
        changed: list[Watch] = []
        for w in list(self._watches):
            snap = self.lookup(w.node_id, w.cluster)
            digest = snap.digest if snap is not None else ""
            if digest != w.digest:
                w.digest = digest
                changed.append(w)
                w.notify()
        return changed

    def watch(self, node_id: str, cluster: str | None, notify: Callable[[], None]) -> Watch:
        snap = self.lookup(node_id, cluster)
        w = Watch(node_id, cluster, notify, snap.digest if snap is not None else "")
        self._watches.add(w)
        return w

    def cancel(self, w: Watch) -> None:
        self._watches.discard(w)

    def watch_count(self) -> int:
        return len(self._watches)
