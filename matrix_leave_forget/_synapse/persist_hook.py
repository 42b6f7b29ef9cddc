"""Writing rows in the transaction that persists a batch of events.

A leave served by the module's endpoint is recorded before the answer. Written
in a transaction of its own, the record is one more commit on the database
(~3.5 ms on PostgreSQL) and, on SQLite, where Synapse has one connection and
every transaction takes it in turn, one more place in its queue, behind the work
Synapse starts once an event is persisted (federation sender, user directory,
...): ~2 ms on a ~25 ms leave. Written in the transaction that persists the
leave's event, it costs its rows only, and commits with the event: neither can
be there without the other.
"""

import logging
from collections.abc import Callable, Sequence
from typing import Any

from synapse.module_api import LoggingTransaction, ModuleApi

logger = logging.getLogger(__name__)

# Called in the persisting transaction with the events it writes; must not
# raise (a failure is its own to handle) and must not read what the
# transaction has not written yet.
PersistObserver = Callable[[LoggingTransaction, Sequence[Any]], None]


def observe_persist_txn(api: ModuleApi, observer: PersistObserver) -> bool:
    """Call ``observer(txn, events)`` at the end of every transaction that persists events here.

    Only on a process that persists events (the main process, or an event
    persister worker).

    Why: no ModuleApi callback runs inside Synapse's persistence;
    ``PersistEventsStore._persist_events_txn`` is the transaction that writes a
    batch of events of one room (keyword arguments, ``events_and_contexts``
    among them, on every supported Synapse). It is wrapped on this process's
    store instance only, and left alone if it is not there as expected.

    Returns:
        Whether the observer was installed.
    """
    hs: Any = api._hs
    persist_store = getattr(hs.get_datastores(), "persist_events", None)
    if persist_store is None:
        return False
    original = getattr(persist_store, "_persist_events_txn", None)
    if original is None or not callable(original):
        logger.info("Synapse's event persistence is not as expected: leaves recorded on their own")
        return False

    def persist_events_txn(txn: LoggingTransaction, **kwargs: Any) -> None:
        original(txn, **kwargs)
        events = [
            event
            for event, context in kwargs.get("events_and_contexts") or ()
            if not getattr(context, "rejected", False)
        ]
        if events:
            observer(txn, events)

    persist_store._persist_events_txn = persist_events_txn
    return True
