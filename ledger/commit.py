"""The one commit pipeline: what happens to a batch between the core applying it and its caller hearing of it.

    apply (core) -> write events -> [wait for the previous group's sync] -> sync -> publish -> answer

(per call with a pipelined hook: write -> send -> sync -> wait for the ack -> answer, see after_commit).

A standby's batches (taken from its primary, applied by replay) take the same write and sync step
(`commit_replicated`), without the publish.

Every writer goes through a `CommitPipeline` (the store makes one per handle), in one of two modes:

- per call (the in-process API, `grouped=False`): the engine calls `after_commit` after each committed batch,
  before the call returns: the batch is written to the files (its events first, its header with the commit word
  last), synced, and published. A large batch is written ahead (`write_ahead`) while the core applies its later
  chunks, with a background sync, so most of it is on disk by the time its header is written.
- grouped (the ring server, `grouped=True`): the server applies the core calls of one drained group through
  `apply`; each batch's events are written as it commits, its header only once every earlier batch is durable
  (recovery takes only the last batch for a possible torn tail: a machine crash may keep a later batch while
  losing an earlier unsynced one), and `end_group` syncs the group once, publishes it and answers it, possibly on
  the sync thread while the server applies the next group (whose headers then wait for that sync).
  A call on the handle outside a group (accounts created before serving) is committed per call.

`publish` (default None: nothing) is handed each committed batch's journal range [start, end) once it is durable
(per call with a pipelined hook: once written, its local sync then running beside the round trip) and before it is
answered, in journal order, exactly once: the place where replication's acknowledged publish
goes. The hook protocol, two kinds:

- a plain callable `publish(start, end) -> None`, blocking: it returns once the range is acknowledged, or raises;
- a pipelined hook, an object with `send(start, end) -> concurrent.futures.Future` (ledger.cluster.stream's
  StreamPublisher): send returns at once (it may wait while its own in-flight bound is full); the Future resolves
  once the range is acknowledged, or fails; Futures resolve in send order, once one failed every later one fails,
  and each resolves within the hook's own bound (the pipeline waits PUBLISH_WAIT_S_MAX at most, a backstop).
  Per call, `call(method, ...)` (what the Ledger face runs each command through when the hook is pipelined) sends
  inside the engine's lock, as the batch commits, and waits for the ack only once the core call returned, outside
  that lock: calls from several threads overlap their round trips (one call still returns only after its own
  batch is acknowledged). Grouped, the sync thread syncs a group and sends its batches, and an answering thread
  waits for their acks and answers, in journal order, while the sync thread goes on with the next group.

Either way, a publish that fails (raises, or its Future fails) poisons the handle and its batch (with its group,
and every later one) is never answered. Reads from other threads may see a batch that is durable locally but not
yet acknowledged (its call has not returned): as with a local journal, only a returned call is promised.

durability "os" writes nothing here (the core writes into the shared mapping, a flusher syncs): the pipeline only
publishes, and the engine calls it only when there is a publish hook.
"""
from __future__ import annotations

import concurrent.futures
import threading
from typing import Any, Callable

__all__ = ["PUBLISH_WAIT_S_MAX", "CommitGroup", "CommitPipeline", "PendingGroup", "Publish"]

Publish = Any   # Callable[[int, int], None], or an object with send(start, end) -> Future (see above)
# The longest the pipeline waits for a pipelined hook's Future: a backstop only, the hook bounds its own acks.
PUBLISH_WAIT_S_MAX = 120.0


class PendingGroup:
    """A group handed to the sync thread: `synced` is set once its sync returned (having failed if `error`),
    `answered` resolves once its producers are answered."""
    __slots__ = ("synced", "error", "answered")

    def __init__(self) -> None:
        self.synced = threading.Event()
        self.error: BaseException | None = None
        self.answered: concurrent.futures.Future | None = None


class CommitGroup:
    """One drained group of the grouped mode: where its unsynced batches start, and its committed batches."""
    __slots__ = ("unsynced", "batches")

    def __init__(self, unsynced: int) -> None:
        self.unsynced = unsynced                 # batches from here on are written but not yet synced
        self.batches: list[tuple[int, int]] = []  # the [start, end) of each batch committed, to publish


class CommitPipeline:
    """Owns the commit sequence of one handle (see the module docstring). `journal` writes and syncs (a
    FileJournal; None in memory); `writes`: the pipeline writes and syncs (durability "fsync", writable),
    otherwise it only publishes."""

    def __init__(self, journal: Any, *, writes: bool, grouped: bool, publish: Publish | None = None) -> None:
        assert journal is not None or not writes
        self.journal = journal
        self.writes = writes
        self.grouped = grouped
        self.publish = publish
        self._send: Callable[[int, int], concurrent.futures.Future] | None = getattr(publish, "send", None)
        self._local = threading.local()   # per call: whether this thread's call waits later, and for what
        self._publish_failure: BaseException | None = None   # a failed ack: no later group is answered
        self._on_poison: Callable[[], None] | None = None
        self._engine: Any = None
        self._applying = False        # grouped: apply() is running a core call; the engine's callbacks wait
        self._wrote_ahead = False     # write_ahead ran for the batch being applied: its background sync ends first
        self._published_end = 0       # publish never repeats a range (the core retries after_commit on Ctrl-C)
        # Grouped: the group handed last to the sync thread, which syncs and answers it while the owner applies the
        # next one. The sync thread takes its tasks in order.
        self.pending: PendingGroup | None = None
        self._syncer = (concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-ring-sync")
                        if grouped else None)
        # Grouped with a pipelined hook: waits for each group's acks and answers it, in order.
        self._answerer = (concurrent.futures.ThreadPoolExecutor(max_workers=1,
                                                                thread_name_prefix="ledger-ring-answer")
                          if grouped and self._send is not None else None)

    @property
    def pipelined(self) -> bool:
        """True when the publish hook is pipelined (has send): commands then run through call()."""
        return self._send is not None

    def call(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run the engine command `method(*args, **kwargs)` with its batch's ack waited for after it returned,
        outside the engine's lock (the pipelined hook's send happened inside, as the batch committed); returns
        its result once the batch is acknowledged. A failed ack poisons the handle and is raised."""
        local = self._local
        local.deferred = True
        try:
            result = method(*args, **kwargs)
        finally:
            local.deferred = False
            future, local.future = getattr(local, "future", None), None
        if future is not None:
            self._wait_published(future)
        return result

    def attach(self, engine: Any, poison: Callable[[], None]) -> None:
        """The engine whose batches this pipeline commits (known once the store has chosen it at open), and what
        makes its handle unusable when a write, sync or publish fails."""
        self._engine = engine
        self._on_poison = poison
        self._published_end = engine.write_position

    @property
    def engine_callbacks(self) -> dict[str, Any]:
        """The after_commit / write_ahead arguments for the engine: wired when there is something to do per batch
        (writes, or a publish hook), else None (the core then makes no Python call per batch)."""
        if self.writes:
            return {"after_commit": self.after_commit, "write_ahead": self.write_ahead}
        return {"after_commit": self.after_commit if self.publish is not None else None, "write_ahead": None}

    # -- per call (the engine's callbacks) --

    def after_commit(self, start: int, end: int) -> None:
        """The core's callback after each committed batch [start, end), before its call returns: write its header
        after its events, let a background sync of its written-ahead events end, sync, publish. Inside a grouped
        apply() it does nothing: apply() takes the batch on once the core call returns.

        Under call() (a pipelined hook, the call's ack waited for once the engine's lock is released) the batch is
        sent before the local sync, so that the sync overlaps the stream's round trip instead of adding to it: the
        call is still answered only once both are done (the sync here, the ack in call()). A crash between the
        two may leave the stream a batch ahead of this journal, which is any standby's state: a restarted node
        follows the stream (docs/CLUSTER.md, "Restart"). A direct engine call keeps sync, then publish and wait:
        a retried after_commit (Ctrl-C in the sync) must not lose the Future it would wait for."""
        if self._applying:
            return
        deferred = getattr(self._local, "deferred", False)
        if self.writes:
            journal = self.journal
            try:
                journal.write(start, end)
            finally:
                if self._wrote_ahead:
                    self._wrote_ahead = False
                    journal.finish_write_ahead()   # a sync still running over this batch's files: let it end
            if deferred and self.publish is not None:
                self._defer_published(start, end)
            journal.sync(start, end)
            if deferred:
                return
        if self.publish is not None:
            future = self._publish(start, end)
            if future is not None:
                if deferred:
                    self._local.future = future      # call() waits, once the engine's lock is released
                else:
                    self._wait_published(future)     # a direct engine call: wait here

    def _defer_published(self, start: int, end: int) -> None:
        """Send [start, end) and leave its Future for call() to wait for (a retried commit sends nothing more:
        the Future of its first attempt stays)."""
        future = self._publish(start, end)
        if future is not None:
            self._local.future = future

    def write_ahead(self, header_position: int, end: int) -> bool | None:
        """The core's callback inside a large batch: write its final events so far and start syncing them in the
        background (FileJournal.write_ahead). Inside a grouped apply() it writes nothing: True if it wrote."""
        if self._applying:
            return None
        self._wrote_ahead = True
        return self.journal.write_ahead(header_position, end)

    def commit_replicated(self, start: int, end: int) -> None:
        """A standby's batch [start, end), taken from its primary and applied by replay (Store.append_replicated):
        written (events, then its header) and synced, as after_commit does, and never published (the primary
        published it). A failed write or sync poisons the handle, as for a command."""
        if self.writes:
            self._write(self.journal.write, start, end)
            self._sync(start, end)

    # -- grouped --

    def begin_group(self) -> CommitGroup:
        """A new group, starting at the engine's write position."""
        assert self.grouped and self._engine is not None
        return CommitGroup(self._engine.write_position)

    def apply(self, group: CommitGroup, call: Callable[[], Any]) -> None:
        """Run one core call of the group (it commits at most one batch), then take its batch on: its events go
        to the files at once (past the last commit word they are a torn tail to recovery, whatever reached the
        disk); its header only once every earlier batch is durable (the previous group's sync, then this
        group's earlier batches)."""
        engine = self._engine
        start = engine.write_position
        self._applying = True
        try:
            call()
        finally:
            self._applying = False
        end = engine.write_position
        if end == start:
            return                # nothing committed (queries, or every row failed): nothing to write
        journal = self.journal
        self._write(journal.write_events, start, end)
        self.wait_previous_synced()
        self._sync(group.unsynced, start)
        self._write(journal.write, start, end)
        group.unsynced = start
        group.batches.append((start, end))

    def end_group(self, group: CommitGroup, answer: Callable[[], None],
                  background: bool) -> concurrent.futures.Future | None:
        """Sync the group's unsynced batches once, publish them, then answer(). background (and something to
        sync): on the sync thread, after the previous group is answered; returns its Future (the owner reuses the
        group's buffers once it resolved). Otherwise here, once every group handed to the sync thread is answered
        (answers leave in journal order): None."""
        end = self._engine.write_position
        if background and (self.writes or self._send is not None) and end > group.unsynced:
            assert self._syncer is not None, "grouped mode only"
            pending = PendingGroup()
            if self._answerer is None:
                pending.answered = self._syncer.submit(self._sync_publish_answer, group, end, answer, pending)
            else:   # pipelined: the sync thread goes on to the next group while this one's acks are awaited
                sent = self._syncer.submit(self._sync_send, group, end, pending)
                pending.answered = self._answerer.submit(self._answer_acknowledged, sent, answer)
            self.pending = pending
            return pending.answered
        self.settle()
        self._sync_publish_answer(group, end, answer, None)
        return None

    def raise_if_previous_failed(self) -> None:
        """If the sync of the group handed to the sync thread last has returned, raise what it raised (the real
        error, rather than the poisoned handle's later)."""
        if self.pending is not None and self.pending.synced.is_set():
            self.wait_previous_synced()

    def wait_previous_synced(self) -> None:
        """Wait until the sync of the group handed to the sync thread last has returned; raise what it raised."""
        pending = self.pending
        if pending is not None:
            pending.synced.wait()
            if pending.error is not None:
                raise pending.error

    def settle(self) -> bool:
        """Wait until every group handed to the sync thread is durable, published and answered. A failed sync or
        publish poisoned the handle and is raised here: that group is never acknowledged. Returns whether there
        was one."""
        pending, self.pending = self.pending, None
        if pending is None:
            return False
        assert pending.answered is not None
        pending.answered.result()
        return True

    def stop(self) -> None:
        """Forget the pending group and end the sync thread (after settle(), or when giving up). Idempotent."""
        self.pending = None
        if self._syncer is not None:
            self._syncer.shutdown(wait=True)
        if self._answerer is not None:
            self._answerer.shutdown(wait=True)

    def _sync_publish_answer(self, group: CommitGroup, end: int, answer: Callable[[], None],
                             pending: PendingGroup | None) -> None:
        try:
            self._sync(group.unsynced, end)
        except BaseException as error:
            if pending is not None:
                pending.error = error
            raise
        finally:
            if pending is not None:
                pending.synced.set()
        if self.publish is not None:
            futures = [self._publish(start, stop) for start, stop in group.batches]
            for future in futures:
                if future is not None:
                    self._wait_published(future)
        answer()                  # only once every batch of the group is durable (and published)

    def _sync_send(self, group: CommitGroup, end: int, pending: PendingGroup) -> list[concurrent.futures.Future]:
        """The sync thread's part of a group, pipelined: sync it, send its batches; their Futures."""
        try:
            self._sync(group.unsynced, end)
        except BaseException as error:
            pending.error = error
            raise
        finally:
            pending.synced.set()
        futures = [self._publish(start, stop) for start, stop in group.batches]
        return [future for future in futures if future is not None]

    def _answer_acknowledged(self, sent: concurrent.futures.Future, answer: Callable[[], None]) -> None:
        """The answering thread's part of a group: once it is synced and sent (`sent`) and its acks arrived,
        answer it. Groups come here in journal order; after a failed ack no later group is answered."""
        futures = sent.result()   # its sync or send failed: raised, never answered
        for future in futures:
            self._wait_published(future)
        if self._publish_failure is not None:
            raise self._publish_failure
        answer()

    def _sync(self, start: int, end: int) -> None:
        """Make journal positions [start, end) durable (written before). A failed sync poisons the handle (no
        retry could prove the data reached the disk) and is raised: nothing of the group is acknowledged."""
        assert start <= end
        if self.writes and end > start:
            try:
                self.journal.sync(start, end)
            except BaseException:
                self._poison()
                raise

    def _write(self, write: Callable[[int, int], None], start: int, end: int) -> None:
        """write(start, end): the batch [start, end) held in the private mapping goes to the journal files."""
        if self.writes:
            try:
                write(start, end)
            except BaseException:
                self._poison()  # applied in memory, not in the files: nothing more may use this state
                raise

    def _poison(self) -> None:
        assert self._on_poison is not None, "attach() gives the pipeline its handle's poison"
        self._on_poison()

    def _publish(self, start: int, end: int) -> concurrent.futures.Future | None:
        """Hand [start, end) to the hook: a plain one returns once acknowledged (None here), a pipelined one's
        send returns its Future. A failure poisons the handle."""
        if end <= self._published_end:
            return None           # published already (a commit retried after Ctrl-C)
        assert start == self._published_end, f"publish of [{start}, {end}) after {self._published_end}: a gap"
        publish = self.publish
        assert publish is not None
        try:
            future = None
            if self._send is not None:
                future = self._send(start, end)
            else:
                publish(start, end)
        except BaseException:
            self._poison()
            raise
        self._published_end = end
        return future

    def _wait_published(self, future: concurrent.futures.Future) -> None:
        """Wait for a pipelined hook's Future (PUBLISH_WAIT_S_MAX at most); a failure poisons and is raised."""
        try:
            future.result(PUBLISH_WAIT_S_MAX)
        except BaseException as error:
            self._publish_failure = self._publish_failure or error
            self._poison()
            raise
