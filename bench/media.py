"""Media deletion and the media reference index (issue 18): what they cost.

Four measurements, each against its baseline in the same run (not tests:
nothing here asserts a timing):

* ``purge``: purging rooms that carry media, ``retention.media: keep`` against
  ``retention.media: delete`` with ``media_grace: 1s``. Rooms are seeded once
  (bench/purge_storm.py's ~100 events per room, plus text messages and
  ``m.image`` events referencing uploaded images, some with an uploaded
  thumbnail) and each side runs on a copy of that database. First
  ``per_room`` rooms are forgotten one at a time (each waited for), then the
  storm: every other room at once. Times run from the moment a room fell
  due (its forget + the retention period) until it is purged and, with
  ``delete``, until Synapse no longer holds its media.
* ``send``: send latency (``m.text`` and ``m.image`` with mxc URLs) on three
  Synapses started on copies of one database, batches alternated between
  them: the module as deployed with media deletion (the index running), the
  same module with the index's loop replaced by a no-op
  (bench/media_hook.py: no setting turns the index off), and Synapse without
  the module.
* ``index``: a database seeded directly with N events (``--media-share`` of
  them referencing media), the index's positions removed as on a server the
  module was just installed on; Synapse with the module is started and the
  back-fill is timed (events/s), then the index's rows and bytes are read.

Usage::

    python bench/media.py [--quick] [--database sqlite|postgres|both]
        [--parts purge,send,index] [--rooms 200] [--per-room 5]
        [--sends 1500] [--events 1000000] [--media-share 0.15] [--live] [--aa]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import os
import random
import sqlite3
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import attr

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (  # noqa: E402
    ADMIN,
    SERVER_NAME,
    SynapseProcess,
    User,
    log,
    machine,
    metrics_delta,
    ms,
    parallel,
    percentile,
    quote_room,
    request,
    synapse_metrics,
    table,
    write_json,
)
from bench.purge_storm import (  # noqa: E402
    PERIOD_S,
    Conn,
    LiveUser,
    Seeded,
    copy_of,
    seed_room,
    seed_with,
)
from bench.seed import Sink, fresh_synapse  # noqa: E402
from tests.support import rawdb  # noqa: E402

MODULE_BASE: dict[str, Any] = {"mount": "listener", "forget_rate_limit": None}
# The purge sides: the same retention as bench/purge_storm.py, media kept or
# deleted after a grace short enough to happen within the run.
GRACE_S = 1.0
RETENTION = {"period": f"{int(PERIOD_S)}s", "sweep_interval": "1s"}
PURGE_SIDES: dict[str, dict[str, Any]] = {
    "keep": {**RETENTION, "media": "keep"},
    "delete": {**RETENTION, "media": "delete", "media_grace": f"{int(GRACE_S)}s"},
}
# Per seeded room: images in m.image events (the first THUMBNAILED of them
# with an uploaded thumbnail of their own in info.thumbnail_url) and text
# messages, besides the ~100 events of bench/purge_storm.py's rooms.
IMAGES_PER_ROOM = 3
THUMBNAILED = 2
TEXTS_PER_ROOM = 10
# Seconds to wait for a room (and its media) after it fell due, and for a
# storm to drain.
ROOM_TIMEOUT_S = 120.0
STORM_TIMEOUT_S = 1200.0
# With --live, how long media may take after the storm's rooms are gone.
LIVE_MEDIA_WAIT_S = 60.0

HOOK_INDEX_OFF = {"module": "bench.media_hook.MediaIndexOff", "config": {}}
# The send sides: the module as deployed with a retention period (media
# deletion is then the default), the same with the index's loop off, and
# Synapse without the module.
SEND_RETENTION = {"period": "7d"}
SEND_BATCH = 20
SEND_WARMUP = 10

# Index seeding: events per room, and the mix of media events (kind, share).
EVENTS_PER_SEEDED_ROOM = 1000
MEDIA_MIX = (
    ("image_thumb", 0.5),  # m.image with url and info.thumbnail_url
    ("image", 0.3),  # m.image with url only
    ("file", 0.1),  # m.file
    ("sticker", 0.1),  # m.sticker event
)


# -- media files ---------------------------------------------------------------------


def jpeg(seed: int, size: tuple[int, int] = (320, 240)) -> bytes:
    """A JPEG of noise (not compressible to nothing, so files have a realistic size)."""
    from PIL import Image

    rng = random.Random(seed)
    image = Image.frombytes("RGB", size, rng.randbytes(size[0] * size[1] * 3))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=80)
    return out.getvalue()


def upload(hs: SynapseProcess, user: User, data: bytes, name: str = "i.jpg") -> str:
    """Upload through Synapse's media API; the mxc URI."""
    resp = request(
        hs.client_port,
        "POST",
        f"/_matrix/media/v3/upload?filename={name}",
        raw_body=data,
        headers={"Content-Type": "image/jpeg"},
        token=user.access_token,
    )
    if resp.status != 200:
        raise RuntimeError(f"upload failed: {resp.status} {resp.body}")
    return str(resp.body["content_uri"])


def image_content(uri: str, thumbnail: str | None, size: int) -> dict[str, Any]:
    """An m.image message as clients send it."""
    info: dict[str, Any] = {"mimetype": "image/jpeg", "w": 320, "h": 240, "size": size}
    if thumbnail is not None:
        info["thumbnail_url"] = thumbnail
        info["thumbnail_info"] = {"mimetype": "image/jpeg", "w": 80, "h": 60}
    return {"msgtype": "m.image", "body": "IMG.jpg", "url": uri, "info": info}


def media_id(uri: str) -> str:
    return uri.rsplit("/", 1)[1]


# -- purge: keep vs delete -------------------------------------------------------------


def seed_media_room(args: tuple[SynapseProcess, User, int]) -> tuple[str, list[str]]:
    """One room: bench/purge_storm.py's ~100 events, text, and images; (room, media ids)."""
    hs, user, index = args
    room = seed_room((hs, user, index))
    conn = Conn(hs.client_port)
    media: list[str] = []
    bodies: list[dict[str, Any]] = []
    for k in range(IMAGES_PER_ROOM):
        data = jpeg(index * 100 + k)
        uri = upload(hs, user, data)
        thumb = None
        if k < THUMBNAILED:
            thumb = upload(hs, user, jpeg(index * 100 + k + 50, (80, 60)), "t.jpg")
            media.append(media_id(thumb))
        media.append(media_id(uri))
        bodies.append(image_content(uri, thumb, len(data)))
    for k in range(TEXTS_PER_ROOM):
        bodies.insert(k * len(bodies) // TEXTS_PER_ROOM, {"msgtype": "m.text", "body": f"t{k}"})
    for k, body in enumerate(bodies):
        path = f"/_matrix/client/v3/rooms/{quote_room(room)}/send/m.room.message/s{k}"
        status, answer = conn.call("PUT", path, user.access_token, body)
        if status != 200:
            raise RuntimeError(f"send failed: {status} {answer}")
    return room, media


def seed_media_rooms(database: str, n: int) -> tuple[Seeded, dict[str, list[str]]]:
    """A stopped Synapse with n rooms carrying media; each side runs on a copy."""
    made, seeded = seed_with(database, n, seed_media_room, MODULE_BASE)
    return attr.evolve(made, rooms=[room for room, _ in seeded]), dict(seeded)


def _count_in(hs: SynapseProcess, sql: str, values: Sequence[str]) -> int:
    """``sql`` (a COUNT with ``IN ({})``) over values, 500 at a time."""
    total = 0
    for i in range(0, len(values), 500):
        chunk = values[i : i + 500]
        rows = rawdb.query(hs, sql.format(", ".join("?" for _ in chunk)), chunk)
        total += int(rows[0][0])
    return total


def rooms_left(hs: SynapseProcess, rooms: Sequence[str]) -> int:
    return _count_in(hs, "SELECT COUNT(*) FROM rooms WHERE room_id IN ({})", rooms)


def media_left(hs: SynapseProcess, media: Sequence[str]) -> int:
    return _count_in(
        hs, "SELECT COUNT(*) FROM local_media_repository WHERE media_id IN ({})", media
    )


def wait_gone(
    hs: SynapseProcess,
    rooms: Sequence[str],
    media: Sequence[str],
    due: float,
    timeout: float,
    poll_s: float,
    media_wait: float | None = None,
) -> dict[str, Any]:
    """Poll until the rooms are gone and, if ``media`` is given, their media too.

    Returns:
        Seconds after ``due`` when the rooms were gone and when the media was
        (None if not within the timeout, or within ``media_wait`` of the rooms),
        and what was left at the end.
    """
    deadline = time.monotonic() + timeout
    rooms_gone: float | None = None
    media_gone: float | None = None
    left_rooms, left_media = len(rooms), len(media)
    while time.monotonic() < deadline:
        if rooms_gone is None:
            left_rooms = rooms_left(hs, rooms)
            if left_rooms == 0:
                rooms_gone = time.monotonic()
                if media_wait is not None:
                    deadline = min(deadline, rooms_gone + media_wait)
        if media:
            left_media = media_left(hs, media)
            if left_media == 0 and media_gone is None:
                media_gone = time.monotonic()
        if rooms_gone is not None and (not media or media_gone is not None):
            break
        time.sleep(poll_s)
    return {
        "rooms_gone_s": round(rooms_gone - due, 2) if rooms_gone is not None else None,
        "media_gone_s": round(media_gone - due, 2) if media_gone is not None else None,
        "rooms_left": left_rooms,
        "media_left": left_media,
    }


def leave_forget(port: int, user: User, room: str) -> None:
    conn = Conn(port)
    for action in ("leave", "forget"):
        status, body = conn.call(
            "POST", f"/_matrix/client/v3/rooms/{quote_room(room)}/{action}", user.access_token, {}
        )
        if status != 200:
            raise RuntimeError(f"{action} {room}: {status} {body}")


def db_time(txns: dict[str, dict[str, float]], prefix: str) -> dict[str, float]:
    """Transactions whose description starts with prefix: how many, and their total ms."""
    chosen = [v for d, v in txns.items() if d.startswith(prefix)]
    return {
        "count": round(sum(v["count"] for v in chosen)),
        "ms": round(sum(v["total_ms"] for v in chosen), 1),
    }


def run_purge_side(
    seeded: Seeded, media: dict[str, list[str]], side: str, per_room: int, live: bool
) -> dict[str, Any]:
    """One side (``keep`` or ``delete``) on a copy of the seeded database."""
    database = seeded.hs.database
    hs = copy_of(seeded, {**MODULE_BASE, "retention": PURGE_SIDES[side]}, {})
    hs.start(timeout=120)
    try:
        member = {
            room: seeded.owners[i % len(seeded.owners)] for i, room in enumerate(seeded.rooms)
        }
        watch_media = side == "delete"
        single_rooms, storm_rooms = seeded.rooms[:per_room], seeded.rooms[per_room:]
        # Let start-up work (catch-up, the index's first runs) settle.
        time.sleep(3)
        before = synapse_metrics(hs)
        singles = []
        for room in single_rooms:
            leave_forget(hs.module_port, member[room], room)
            due = time.monotonic() + PERIOD_S
            singles.append(
                wait_gone(hs, [room], media[room] if watch_media else [], due, ROOM_TIMEOUT_S, 0.1)
            )
        single_txns = metrics_delta(before, synapse_metrics(hs))
        log(f"{database} {side}: one room at a time: {singles}")

        live_user = LiveUser(hs, seeded.live_user, seeded.live_room) if live else None
        if live_user is not None:
            live_user.start()
        before = synapse_metrics(hs)
        started = time.monotonic()
        parallel(lambda room: leave_forget(hs.module_port, member[room], room), storm_rooms, 4)
        last_forget = time.monotonic()
        storm_media = [m for room in storm_rooms for m in media[room]] if watch_media else []
        storm = wait_gone(
            hs,
            storm_rooms,
            storm_media,
            last_forget + PERIOD_S,
            STORM_TIMEOUT_S,
            0.25,
            LIVE_MEDIA_WAIT_S if live else None,
        )
        storm["forgets_s"] = round(last_forget - started, 1)
        if live_user is not None:
            live_user.stop_event.set()
            live_user.join(30)
        storm_txns = metrics_delta(before, synapse_metrics(hs))
        log(f"{database} {side}: storm of {len(storm_rooms)}: {storm}")
        media_rows = {
            str(state): int(count)
            for state, count in rawdb.query(
                hs, "SELECT state, COUNT(*) FROM leave_forget_media_deletions GROUP BY state"
            )
        }
        return {
            "database": database,
            "side": side,
            "live": live,
            "single": singles,
            "single_db": {
                "all": db_time(single_txns, ""),
                "synapse_purge": db_time(single_txns, "purge"),
                "module_media": db_time(single_txns, "leave_forget_media"),
                "by_desc": {d: round(v["total_ms"], 1) for d, v in sorted(single_txns.items())},
            },
            "storm_rooms": len(storm_rooms),
            "storm_media": sum(len(media[room]) for room in storm_rooms),
            "storm": storm,
            "storm_db": {
                "all": db_time(storm_txns, ""),
                "synapse_purge": db_time(storm_txns, "purge"),
                "module_media": db_time(storm_txns, "leave_forget_media"),
                "by_desc": {d: round(v["total_ms"], 1) for d, v in sorted(storm_txns.items())},
                "module_retention": db_time(storm_txns, "leave_forget_"),
            },
            "media_deletions": media_rows,
        }
    finally:
        hs.cleanup()


def run_purge(database: str, rooms: int, per_room: int, live: bool) -> list[dict[str, Any]]:
    """Both sides on copies of one seeded database."""
    seeded, media = seed_media_rooms(database, per_room + rooms)
    try:
        return [run_purge_side(seeded, media, side, per_room, live) for side in PURGE_SIDES]
    finally:
        seeded.hs.cleanup()


def _done_s(result: dict[str, Any]) -> float | None:
    """When the room and (with ``delete``) its media were gone, s after due."""
    if result["rooms_gone_s"] is None:
        return None
    if result.get("media_gone_s") is None and result["media_left"]:
        return None
    return max(result["rooms_gone_s"], result.get("media_gone_s") or 0.0)


def _median(values: Sequence[float | None]) -> float | None:
    done = sorted(v for v in values if v is not None)
    if len(done) < len(values) or not done:
        return None
    return (
        done[len(done) // 2]
        if len(done) % 2
        else (done[len(done) // 2 - 1] + done[len(done) // 2]) / 2
    )


def _ratio(a: float | None, b: float | None) -> float | str:
    if a is None or b is None or b <= 0:
        return "-"
    return round(a / b, 2)


def _db_cell(keep: dict[str, Any], delete: dict[str, Any]) -> str:
    """Synapse's time in every transaction from the first forget until done, both sides."""
    k, d = keep["all"]["ms"], delete["all"]["ms"]
    return f"{k:.0f} / {d:.0f} ({_ratio(d, k)})"


def purge_report(results: Sequence[dict[str, Any]]) -> str:
    """Keep vs delete, per room and for the storm, per engine."""
    rows = []
    by_db: dict[str, dict[str, dict[str, Any]]] = {}
    for r in results:
        by_db.setdefault(r["database"] + (" + live" if r["live"] else ""), {})[r["side"]] = r
    for db, sides in by_db.items():
        keep, delete = sides.get("keep"), sides.get("delete")
        if keep is None or delete is None:
            continue
        k_single = _median([_done_s(s) for s in keep["single"]])
        d_single = _median([_done_s(s) for s in delete["single"]])
        d_single_rooms = _median([s["rooms_gone_s"] for s in delete["single"]])
        k_storm, d_storm = _done_s(keep["storm"]), _done_s(delete["storm"])
        rows.append(
            [
                db,
                f"per room (median of {len(keep['single'])})",
                k_single,
                d_single_rooms,
                d_single,
                _ratio(d_single, k_single),
                _ratio(None if d_single is None else d_single - GRACE_S, k_single),
                _db_cell(keep["single_db"], delete["single_db"]),
            ]
        )
        storm_name = f"storm of {keep['storm_rooms']} ({delete['storm_media']} media)"
        if d_storm is None:
            storm_name += f": {delete['storm']['media_left']} media LEFT"
        rows.append(
            [
                db,
                storm_name,
                k_storm,
                delete["storm"]["rooms_gone_s"],
                d_storm,
                _ratio(d_storm, k_storm),
                _ratio(None if d_storm is None else d_storm - GRACE_S, k_storm),
                _db_cell(keep["storm_db"], delete["storm_db"]),
            ]
        )
    return table(
        [
            "db",
            "rooms",
            "keep: purged (s after due)",
            "delete: purged",
            "delete: purged + media gone",
            "ratio delete / keep",
            "ratio without the 1 s grace",
            "DB ms, every transaction: keep / delete (ratio)",
        ],
        rows,
    )


# -- send: index on / off / native -------------------------------------------------------


def seed_send(database: str, images: int) -> tuple[SynapseProcess, User, str, list[dict[str, Any]]]:
    """A stopped Synapse with a sender, their room, and image contents to send."""
    hs = SynapseProcess({**MODULE_BASE, "retention": SEND_RETENTION}, {}, database=database)
    hs.start(timeout=120)
    try:
        user = hs.register("sender")
        room = hs.create_room(user)
        contents = []
        for k in range(images):
            data = jpeg(k)
            thumb = upload(hs, user, jpeg(k + 1000, (80, 60)), "t.jpg") if k % 2 == 0 else None
            contents.append(image_content(upload(hs, user, data), thumb, len(data)))
        hs.stop()
    except BaseException:
        hs.cleanup()
        raise
    return hs, user, room, contents


def send_sides(seed_hs: SynapseProcess, aa: bool = False) -> dict[str, SynapseProcess]:
    """The three servers, each on its own copy of the seeded database (stopped).

    Args:
        seed_hs: The seeded (stopped) Synapse.
        aa: The A/A control: the ``index on`` server gets the index off too, so
            that its ratio to ``index off`` shows how far two identical servers stray.
    """
    seeded = Seeded(seed_hs, User("", "", ""), [], [], User("", "", ""), "")
    module = {**MODULE_BASE, "retention": SEND_RETENTION}
    index_off = {
        "modules": [
            HOOK_INDEX_OFF,
            {"module": "matrix_leave_forget.LeaveForgetModule", "config": module},
        ]
    }
    return {
        "index on": copy_of(seeded, module, index_off if aa else {}),
        "index off": copy_of(seeded, module, index_off),
        "native": copy_of(seeded, None, {}),
    }


class Sender:
    """Sends messages to one server's room on a keep-alive connection; records latencies."""

    def __init__(self, hs: SynapseProcess, user: User, room: str, name: str) -> None:
        self.conn = Conn(hs.client_port)
        self.user = user
        self.prefix = f"/_matrix/client/v3/rooms/{quote_room(room)}/send/m.room.message/"
        self.name = name
        self.samples: dict[str, list[float]] = {"text": [], "image": []}
        self._txn = 0

    def send(self, kind: str, content: dict[str, Any], record: bool = True) -> None:
        self._txn += 1
        started = time.perf_counter()
        status, body = self.conn.call(
            "PUT", f"{self.prefix}{self.name}-{self._txn}", self.user.access_token, content
        )
        elapsed = time.perf_counter() - started
        if status != 200:
            raise RuntimeError(f"send on {self.name}: {status} {body}")
        if record:
            self.samples[kind].append(elapsed)


def run_send(database: str, sends: int, aa: bool = False) -> dict[str, Any]:
    """Alternate batches between the three servers; send p50/p95 per side and kind.

    ``aa``: the A/A control (:func:`send_sides`).
    """
    seed_hs, user, room, images = seed_send(database, 20)
    sides = send_sides(seed_hs, aa)
    try:
        for hs in sides.values():
            hs.start(timeout=120)
        # Start-up work (catch-up, the index's first runs) done before measuring.
        time.sleep(5)
        senders = {
            name: Sender(hs, user, room, name.replace(" ", "")) for name, hs in sides.items()
        }
        text = {"msgtype": "m.text", "body": "A message of ordinary length, no media in it."}

        def batch(sender: Sender, count: int, record: bool = True) -> None:
            for k in range(count):
                if k % 2:
                    sender.send("image", images[(sender._txn // 2) % len(images)], record)
                else:
                    sender.send("text", text, record)

        for sender in senders.values():
            batch(sender, SEND_WARMUP, record=False)
        order = list(senders.values())
        rounds = max(1, sends // (2 * SEND_BATCH))
        for i in range(rounds):
            # A B C C B A: each side as often early as late in a round.
            for sender in order + order[::-1]:
                batch(sender, SEND_BATCH)
            if i % 10 == 9:
                log(f"{database} send: round {i + 1} of {rounds}")
        index_txns = {
            name: metrics_delta({}, synapse_metrics(hs)).get("leave_forget_media_index")
            for name, hs in sides.items()
        }
        refs = {
            name: int(rawdb.query(hs, "SELECT COUNT(*) FROM leave_forget_media_refs")[0][0])
            for name, hs in sides.items()
            if name != "native"
        }
        out: dict[str, Any] = {"database": database, "aa": aa, "sides": {}, "index_refs": refs}
        for name, sender in senders.items():
            out["sides"][name] = {
                kind: {
                    "n": len(values),
                    "p50_ms": ms(percentile(values, 50)),
                    "p95_ms": ms(percentile(values, 95)),
                }
                for kind, values in {
                    **sender.samples,
                    "all": sender.samples["text"] + sender.samples["image"],
                }.items()
            }
            out["sides"][name]["index_transactions"] = index_txns[name]
        log(f"{database} send: {out['sides']}")
        return out
    finally:
        for hs in sides.values():
            hs.cleanup()
        seed_hs.cleanup()


def send_report(results: Sequence[dict[str, Any]]) -> str:
    rows = []
    for r in results:
        sides = r["sides"]
        for kind in ("text", "image", "all"):
            on, off, native = (sides[s][kind] for s in ("index on", "index off", "native"))
            rows.append(
                [
                    r["database"] + (" A/A: on = off" if r.get("aa") else ""),
                    kind,
                    on["n"],
                    f"{on['p50_ms']:.2f} / {on['p95_ms']:.2f}",
                    f"{off['p50_ms']:.2f} / {off['p95_ms']:.2f}",
                    f"{native['p50_ms']:.2f} / {native['p95_ms']:.2f}",
                    _ratio(on["p50_ms"], off["p50_ms"]),
                    _ratio(on["p95_ms"], off["p95_ms"]),
                    _ratio(on["p50_ms"], native["p50_ms"]),
                    _ratio(off["p50_ms"], native["p50_ms"]),
                ]
            )
    return table(
        [
            "db",
            "send",
            "n per side",
            "index on p50 / p95 ms",
            "index off",
            "native",
            "p50 on / off",
            "p95 on / off",
            "p50 on / native",
            "p50 off / native",
        ],
        rows,
    )


# -- index: back-fill rate and size ------------------------------------------------------


def _event_id(i: int) -> str:
    digest = hashlib.sha256(f"bench-event-{i}".encode()).digest()
    return "$" + base64.urlsafe_b64encode(digest).decode().rstrip("=")


def _mxc(rng: random.Random) -> str:
    return f"mxc://{SERVER_NAME}/" + "".join(
        rng.choices("abcdefghijklmnopqrstuvwxyzABCDEFGHIJ", k=24)
    )


def event_content(rng: random.Random, media_share: float) -> tuple[str, dict[str, Any], int]:
    """(type, content, references) of one seeded event: text, or media in MEDIA_MIX's shares."""
    if rng.random() >= media_share:
        words = rng.randint(3, 25)
        body = " ".join(
            rng.choice(("hello", "the", "meeting", "at", "tomorrow", "ok")) for _ in range(words)
        )
        return "m.room.message", {"msgtype": "m.text", "body": body}, 0
    pick, acc = rng.random(), 0.0
    kind = MEDIA_MIX[-1][0]
    for name, share in MEDIA_MIX:
        acc += share
        if pick < acc:
            kind = name
            break
    if kind == "sticker":
        return "m.sticker", {"body": "sticker", "url": _mxc(rng), "info": {"w": 256, "h": 256}}, 1
    if kind == "file":
        content = {
            "msgtype": "m.file",
            "body": "report.pdf",
            "url": _mxc(rng),
            "info": {"size": 48213},
        }
        return "m.room.message", content, 1
    thumb = _mxc(rng) if kind == "image_thumb" else None
    return (
        "m.room.message",
        image_content(_mxc(rng), thumb, rng.randint(20000, 900000)),
        2 if thumb else 1,
    )


def _template(sink: Sink, table_name: str, event_id: str) -> tuple[list[str], list[Any]]:
    """Column names and values of one row Synapse wrote (copied for the seeded ones)."""
    cur = sink.conn.cursor()
    cur.execute(
        f"SELECT * FROM {table_name} WHERE event_id = {'%s' if sink.is_pg else '?'}", (event_id,)
    )
    row = cur.fetchone()
    return [d[0] for d in cur.description], list(row)


def _template_room(sink: Sink, room_id: str) -> tuple[list[str], list[Any]]:
    cur = sink.conn.cursor()
    cur.execute(f"SELECT * FROM rooms WHERE room_id = {'%s' if sink.is_pg else '?'}", (room_id,))
    row = cur.fetchone()
    return [d[0] for d in cur.description], list(row)


def seed_events(sink: Sink, template_event: str, n: int, media_share: float) -> dict[str, int]:
    """n m.room.message / m.sticker events into Synapse's events and event_json.

    Every column not set here is copied from an event Synapse wrote itself
    (``template_event``); the JSON has a real event's shape (auth and prev
    events, hashes, a signature), ~600 bytes for a text message.
    """
    ev_cols, ev_row = _template(sink, "events", template_event)
    js_cols, js_row = _template(sink, "event_json", template_event)
    start = int(sink.execute("SELECT MAX(stream_ordering) FROM events")[0][0]) + 1
    rng = random.Random(18)
    auth_events = [_event_id(-1 - k) for k in range(3)]
    rooms = [
        f"!{hashlib.sha1(str(i).encode()).hexdigest()[:18]}:{SERVER_NAME}"
        for i in range(n // EVENTS_PER_SEEDED_ROOM + 1)
    ]
    # Synapse's start-up looks at the rooms of events it has not seen (its
    # sliding sync tables): each seeded room is a row of ``rooms`` too.
    room_cols, room_row = _template_room(sink, ev_row[ev_cols.index("room_id")])
    sink.insert(
        "rooms",
        room_cols,
        [
            [room if c == "room_id" else v for c, v in zip(room_cols, room_row, strict=True)]
            for room in rooms
        ],
    )
    now = int(time.time() * 1000)
    counts = {"events": 0, "media_events": 0, "references": 0}
    ev_batch: list[list[Any]] = []
    js_batch: list[list[Any]] = []
    for i in range(n):
        event_id = _event_id(i)
        room = rooms[i // EVENTS_PER_SEEDED_ROOM]
        depth = i % EVENTS_PER_SEEDED_ROOM + 10
        etype, content, refs = event_content(rng, media_share)
        sender = f"@u{rng.randrange(500)}:{SERVER_NAME}"
        ts = now - (n - i) * 1000
        values = dict(zip(ev_cols, ev_row, strict=True))
        values.update(
            event_id=event_id,
            room_id=room,
            type=etype,
            depth=depth,
            topological_ordering=depth,
            stream_ordering=start + i,
            origin_server_ts=ts,
            received_ts=ts,
            sender=sender,
        )
        if "contains_url" in values:
            values["contains_url"] = bool(refs)
        ev_batch.append([values[c] for c in ev_cols])
        event = {
            "auth_events": auth_events,
            "content": content,
            "depth": depth,
            "hashes": {"sha256": _event_id(-10 - i)[1:]},
            "origin": SERVER_NAME,
            "origin_server_ts": ts,
            "prev_events": [_event_id(i - 1)],
            "room_id": room,
            "sender": sender,
            "signatures": {SERVER_NAME: {"ed25519:a_bench": (_event_id(i)[1:] * 2)[:86]}},
            "type": etype,
            "unsigned": {"age_ts": ts},
        }
        js_values = dict(zip(js_cols, js_row, strict=True))
        js_values.update(
            event_id=event_id, room_id=room, json=json.dumps(event, separators=(",", ":"))
        )
        js_batch.append([js_values[c] for c in js_cols])
        counts["events"] += 1
        counts["media_events"] += bool(refs)
        counts["references"] += refs
        if len(ev_batch) >= 10000:
            sink.insert("events", ev_cols, ev_batch)
            sink.insert("event_json", js_cols, js_batch)
            ev_batch, js_batch = [], []
    sink.insert("events", ev_cols, ev_batch)
    sink.insert("event_json", js_cols, js_batch)
    head = start + n - 1
    if sink.is_pg:
        # Synapse checks at start-up that its sequence is past every row.
        sink.execute("SELECT setval('events_stream_seq', ?)", (head,))
    # As on a server the module was just installed on: the index has never
    # run (it back-fills every event) and the departures catch-up is at the
    # head (it would otherwise read the seeded events too).
    sink.execute("DELETE FROM leave_forget_media_refs")
    sink.execute("DELETE FROM leave_forget_stream_positions WHERE name LIKE ?", ("media_refs%",))
    sink.execute(
        "UPDATE leave_forget_stream_positions SET stream_id = ? WHERE name = 'departures'", (head,)
    )
    return counts


def index_size(hs: SynapseProcess) -> dict[str, Any]:
    """Rows and bytes of the reference index (table and its indexes); Synapse stopped."""
    rows = int(rawdb.query(hs, "SELECT COUNT(*) FROM leave_forget_media_refs")[0][0])
    if hs.pg_database is None:
        conn = sqlite3.connect(rawdb.sqlite_path(hs))
        try:
            sizes = dict(
                conn.execute(
                    "SELECT name, SUM(pgsize) FROM dbstat WHERE name IN "
                    "('leave_forget_media_refs', 'leave_forget_media_refs_key', "
                    "'leave_forget_media_refs_room') GROUP BY name"
                ).fetchall()
            )
        finally:
            conn.close()
        table_bytes = int(sizes.get("leave_forget_media_refs", 0))
        index_bytes = sum(int(v) for k, v in sizes.items() if k != "leave_forget_media_refs")
    else:
        table_bytes, index_bytes = (
            int(v)
            for v in rawdb.query(
                hs,
                "SELECT pg_table_size('leave_forget_media_refs'),"
                " pg_indexes_size('leave_forget_media_refs')",
            )[0]
        )
    return {"rows": rows, "table_bytes": table_bytes, "index_bytes": index_bytes}


def _media_status(hs: SynapseProcess, admin: User) -> dict[str, Any] | None:
    resp = request(
        hs.client_port, "GET", f"{ADMIN}/retention", token=admin.access_token, timeout=60
    )
    if resp.status != 200:
        return None
    status: dict[str, Any] | None = resp.body.get("media_index")
    return status


def run_index(database: str, events: int, media_share: float) -> dict[str, Any]:
    """Seed ``events`` events, time the index's back-fill over them, read its size."""
    hs, admin = fresh_synapse(database, {"retention": {"period": "7d"}})
    try:
        hs.start(timeout=120)
        room = hs.create_room(admin)
        resp = hs.client(
            "PUT",
            f"/_matrix/client/v3/rooms/{quote_room(room)}/send/m.room.message/template",
            {"msgtype": "m.text", "body": "template"},
            token=admin.access_token,
        )
        template = str(resp.body["event_id"])
        hs.stop()
        sink = Sink(hs)
        started = time.monotonic()
        counts = seed_events(sink, template, events, media_share)
        sink.finish()
        total = int(rawdb.query(hs, "SELECT COUNT(*) FROM events")[0][0])
        took = time.monotonic() - started
        log(f"{database} index: seeded {counts} in {took:.0f}s ({total} events in all)")
        hs.start(timeout=300)
        t_start = time.monotonic()
        # The back-fill starts between the last poll that saw the index's
        # first position and the first that saw it move: times are from the
        # former (over by at most one poll, ~0.1 s).
        unmoved_at: float | None = None
        first_position: int | None = None
        status: dict[str, Any] | None = None
        deadline = t_start + 3600
        while time.monotonic() < deadline:
            polled = time.monotonic()
            status = _media_status(hs, admin)
            if status and status.get("position") is not None:
                if first_position is None:
                    first_position = int(status["position"])
                if int(status["position"]) == first_position:
                    unmoved_at = polled
                if status.get("backfill_done"):
                    break
            time.sleep(0.1)
        done = time.monotonic()
        txns = metrics_delta({}, synapse_metrics(hs)).get("leave_forget_media_index", {})
        hs.stop()
        size = index_size(hs)
        wall = done - (unmoved_at if unmoved_at is not None else t_start)
        result = {
            "database": database,
            "events": total,
            "seeded": counts,
            "media_share": media_share,
            "backfill_done": bool(status and status.get("backfill_done")),
            "backfill_wall_s": round(wall, 2),
            "since_start_s": round(done - t_start, 2),
            "backfill_events_per_s": round(total / wall) if wall > 0 else None,
            "backfill_events_per_db_s": (
                round(total * 1000 / txns["total_ms"]) if txns.get("total_ms") else None
            ),
            "index_transactions": round(txns.get("count", 0)),
            "index_db_s": round(txns.get("total_ms", 0.0) / 1000, 2),
            "size": size,
        }
        log(f"{database} index: {result}")
        return result
    finally:
        hs.cleanup()


def index_report(results: Sequence[dict[str, Any]]) -> str:
    rows = []
    for r in results:
        size, n = r["size"], r["events"]
        per = 10**6 / n
        total_bytes = size["table_bytes"] + size["index_bytes"]
        rows.append(
            [
                r["database"],
                f"{n:,}",
                f"{r['media_share']:.0%}",
                r["backfill_wall_s"],
                f"{r['backfill_events_per_s']:,}" if r["backfill_events_per_s"] else "-",
                round(10**6 / r["backfill_events_per_s"], 1) if r["backfill_events_per_s"] else "-",
                f"{r['index_transactions']} / {r['index_db_s']}",
                (
                    f"{r['backfill_events_per_db_s']:,}"
                    if r.get("backfill_events_per_db_s")
                    else "-"
                ),
                f"{size['rows']:,}",
                round(size["rows"] / n, 3),
                round(total_bytes / max(size["rows"], 1)),
                f"{size['rows'] * per:,.0f}",
                f"{size['table_bytes'] * per / 1e6:.1f} + {size['index_bytes'] * per / 1e6:.1f}",
            ]
        )
    return table(
        [
            "db",
            "events",
            "media events",
            "back-fill s",
            "events/s (wall)",
            "s per 10^6 (wall)",
            "index txns / DB s",
            "events per DB s",
            "refs",
            "refs per event",
            "bytes per ref (table + indexes)",
            "refs per 10^6 events",
            "MB per 10^6 events (table + indexes)",
        ],
        rows,
    )


# -- all -----------------------------------------------------------------------------


def run_all(
    databases: Sequence[str],
    quick: bool,
    parts: Sequence[str] = ("purge", "send", "index"),
    rooms: int | None = None,
    per_room: int | None = None,
    sends: int | None = None,
    events: int | None = None,
    media_share: float = 0.15,
    live: bool = False,
    aa: bool = False,
) -> dict[str, Any]:
    """Every part on every engine; the results by part."""
    out: dict[str, Any] = {"grace_s": GRACE_S, "period_s": PERIOD_S}
    steps: list[tuple[str, Callable[[str], Any]]] = [
        (
            "purge",
            lambda db: run_purge(
                db, rooms or (20 if quick else 200), per_room or (2 if quick else 5), live
            ),
        ),
        ("send", lambda db: run_send(db, sends or (160 if quick else 1500), aa)),
        ("index", lambda db: run_index(db, events or (2 * 10**4 if quick else 10**6), media_share)),
    ]
    for part, step in steps:
        if part not in parts:
            continue
        results: list[Any] = []
        for db in databases:
            result = step(db)
            results.extend(result if isinstance(result, list) else [result])
        out[part] = results
    return out


def report(data: dict[str, Any]) -> str:
    out = []
    if data.get("purge"):
        out.append(
            "### Purge with media: keep vs delete (grace 1 s), seconds after due\n"
            + purge_report(data["purge"])
        )
    if data.get("send"):
        out.append(
            "### Send latency: index on (the module with media deletion), index off (same "
            "module, the index's loop a no-op), native (no module)\n" + send_report(data["send"])
        )
    if data.get("index"):
        out.append("### Reference index: back-fill and size\n" + index_report(data["index"]))
    return "\n\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, ~2-3 minutes")
    parser.add_argument(
        "--database",
        choices=("sqlite", "postgres", "both"),
        help="default both (--quick: sqlite, to stay within a few minutes)",
    )
    parser.add_argument("--parts", default="purge,send,index")
    parser.add_argument("--rooms", type=int, help="storm size (default 200, quick 20)")
    parser.add_argument("--per-room", type=int, help="rooms purged one at a time (default 5)")
    parser.add_argument("--sends", type=int, help="sends per side (default 1500, quick 160)")
    parser.add_argument("--events", type=int, help="events seeded for the index (default 10^6)")
    parser.add_argument("--media-share", type=float, default=0.15)
    parser.add_argument(
        "--live", action="store_true", help="a live user sends every 200 ms during the storm"
    )
    parser.add_argument(
        "--aa",
        action="store_true",
        help="send's A/A control: the 'index on' server runs with the index off too",
    )
    parser.add_argument("--out", help="JSON file name under bench/results/")
    args = parser.parse_args(argv)
    database = args.database or ("sqlite" if args.quick else "both")
    databases = ("sqlite", "postgres") if database == "both" else (database,)
    started = time.monotonic()
    info = machine()
    data = run_all(
        databases,
        args.quick,
        args.parts.split(","),
        args.rooms,
        args.per_room,
        args.sends,
        args.events,
        args.media_share,
        args.live,
        args.aa,
    )
    data["machine"] = info
    data["load_average_at_end"] = os.getloadavg()
    data["seconds"] = round(time.monotonic() - started)
    path = write_json(args.out or f"media{'-quick' if args.quick else ''}.json", data)
    print(report(data))
    print(
        f"\nload average at start {info['load_average_at_start']}, at end "
        f"{data['load_average_at_end']}; {data['seconds']} s"
    )
    print(f"JSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
