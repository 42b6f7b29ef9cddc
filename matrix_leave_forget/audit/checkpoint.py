"""Signed checkpoints of the audit chain, kept where the database cannot rewrite them.

A checkpoint is the chain's head — its ``seq`` and ``hash`` — and the time it
was taken, signed with the homeserver's key, in the spirit of Certificate
Transparency's signed tree heads (RFC 9162). The module writes one on a
schedule, when the head moved, to Synapse's log and as an event into a Matrix
room the operator names (``audit.checkpoint_room``): that room's event graph
is hash-linked and signed, and copied to every other server in the room.
``verify`` checks the chain against checkpoints (audit.iter_verify's
``expected_heads``): a chain cut below a checkpoint, or rewritten under one,
fails. docs/audit.md, "Checkpoints", has the threat model.
"""

import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import IO, Any

from signedjson.sign import SignatureVerifyException, sign_json, verify_signed_json
from signedjson.types import SigningKey, VerifyKey
from synapse.module_api import ModuleApi

from matrix_leave_forget.timestamps import now_ms

logger = logging.getLogger(__name__)

# The type of the checkpoint events sent into the checkpoint room.
CHECKPOINT_EVENT_TYPE = "org.matrix.leave_forget.audit_checkpoint"

# The signed fields of a checkpoint.
_FIELDS = ("origin", "seq", "hash", "ts")


def make_checkpoint(
    origin: str, seq: int, head_hash: str, ts: int, signing_key: SigningKey
) -> dict[str, Any]:
    """A checkpoint of the head (seq, head_hash) at ts, signed by origin."""
    return sign_json(
        {"origin": origin, "seq": seq, "hash": head_hash, "ts": ts}, origin, signing_key
    )


def check_checkpoint(
    checkpoint: Mapping[str, Any],
    origin: str,
    verify_keys: Mapping[str, VerifyKey],
    key_expiry: Mapping[str, int] | None = None,
) -> tuple[int, str]:
    """(seq, hash) of a checkpoint whose signature by origin is valid.

    A key in ``key_expiry`` signs no checkpoint taken at or after its expiry.

    Raises:
        ValueError: saying why the checkpoint is not valid.
    """
    try:
        body = {k: checkpoint[k] for k in _FIELDS}
        signatures = checkpoint["signatures"]
        seq, head_hash, ts = body["seq"], body["hash"], body["ts"]
        if body["origin"] != origin:
            raise ValueError(f"taken by {body['origin']!r}, not {origin!r}")
        if not isinstance(seq, int) or seq < 0 or not isinstance(head_hash, str):
            raise ValueError("seq or hash malformed")
        key_id = next((k for k in signatures.get(origin, {}) if k in verify_keys), None)
        if key_id is None:
            raise ValueError(f"no signature by {origin} with a known key")
        verify_signed_json({**body, "signatures": signatures}, origin, verify_keys[key_id])
    except (KeyError, TypeError, AttributeError, SignatureVerifyException) as exc:
        raise ValueError(f"invalid checkpoint: {exc!r}") from exc
    expired_ts = (key_expiry or {}).get(key_id)
    if expired_ts is not None and isinstance(ts, int) and ts >= expired_ts:
        raise ValueError(f"signed by {key_id}, which expired at {expired_ts}, at ts {ts}")
    return seq, head_hash


def read_checkpoints(stream: IO[str]) -> list[dict[str, Any]]:
    """Checkpoints from a file: JSON lines, each a checkpoint or an event whose content is one.

    An export of the checkpoint room's events (one JSON event per line, as
    ``/messages`` returns them) is accepted as it is.

    Raises:
        ValueError: naming the line that is not a JSON object.
    """
    out: list[dict[str, Any]] = []
    for number, line in enumerate(stream, 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"line {number}: not JSON: {exc}") from exc
        if not isinstance(value, dict):
            raise ValueError(f"line {number}: not a JSON object")
        if value.get("type") == CHECKPOINT_EVENT_TYPE and isinstance(value.get("content"), dict):
            value = value["content"]
        out.append(value)
    return out


def checked_heads(
    checkpoints: Iterable[Mapping[str, Any]],
    origin: str,
    verify_keys: Mapping[str, VerifyKey],
    key_expiry: Mapping[str, int] | None = None,
) -> tuple[list[tuple[int, str]], list[str]]:
    """The heads of the valid checkpoints, and why each other one was rejected.

    An invalid checkpoint (forged, or signed by an unknown or expired key) is
    ignored rather than trusted: it proves nothing either way.
    """
    heads: list[tuple[int, str]] = []
    problems: list[str] = []
    for checkpoint in checkpoints:
        try:
            heads.append(check_checkpoint(checkpoint, origin, verify_keys, key_expiry))
        except ValueError as exc:
            problems.append(str(exc))
    return heads, problems


class Checkpointer:
    """Writes a signed checkpoint when the chain's head moved, to the log and a room.

    Args:
        api: The module API (sending the event).
        origin: The server name.
        signing_key: The homeserver's signing key.
        head: Reads the chain's head: (seq, hash), (0, "") for an empty log.
        room_id: The checkpoint room, or None for the log only.
        sender: The local user who sends checkpoint events (joined to the room).
    """

    def __init__(
        self,
        api: ModuleApi,
        origin: str,
        signing_key: SigningKey,
        head: Callable[[], Awaitable[tuple[int, str]]],
        room_id: str | None,
        sender: str | None,
    ) -> None:
        self._api = api
        self._origin = origin
        self._signing_key = signing_key
        self._head = head
        self._room_id = room_id
        self._sender = sender
        self._last: tuple[int, str] | None = None

    async def run(self) -> dict[str, Any] | None:
        """Write a checkpoint if the head moved since the last one; returns it."""
        seq, head_hash = await self._head()
        if self._last == (seq, head_hash) or seq == 0:
            return None
        checkpoint = make_checkpoint(self._origin, seq, head_hash, now_ms(), self._signing_key)
        logger.info(
            "Audit checkpoint: %s", json.dumps(checkpoint, sort_keys=True, separators=(",", ":"))
        )
        if self._room_id is not None and self._sender is not None:
            try:
                await self._api.create_and_send_event_into_room(
                    {
                        "type": CHECKPOINT_EVENT_TYPE,
                        "room_id": self._room_id,
                        "sender": self._sender,
                        "content": checkpoint,
                    }
                )
            except Exception:
                # Next time the head is checkpointed again: _last stays behind.
                logger.exception(
                    "Could not send the audit checkpoint into %s as %s", self._room_id, self._sender
                )
                return checkpoint
        self._last = (seq, head_hash)
        return checkpoint
