"""The audit log's entry format: hash chain and signatures.

Pure functions with no Synapse dependency, so that the offline CLI (and anyone
holding the server's public key) verifies a log exactly the way the module
writes it.

An entry is a JSON object. Its hash is the unpadded-base64 SHA-256 of the
canonical JSON of every field except ``hash`` and ``signatures``; because the
fields include ``prev_hash`` (the previous entry's hash) and ``seq`` (its
position), editing, deleting or reordering a row breaks the chain from that row
on. Each entry is signed with the homeserver's ed25519 key (signedjson), so the
chain cannot be rebuilt by someone without that key.
"""

import hashlib
import time
from typing import Any, Dict, Iterable, Iterator, Mapping, Optional, Sequence

import attr
from canonicaljson import encode_canonical_json
from signedjson.key import decode_verify_key_bytes, get_verify_key
from signedjson.sign import SignatureVerifyException, sign_json, verify_signed_json
from signedjson.types import SigningKey, VerifyKey
from unpaddedbase64 import decode_base64, encode_base64

GENESIS_HASH = ""

# Every field that is hashed, in the order the CLI prints them.
ENTRY_FIELDS: Sequence[str] = (
    "seq",
    "ts",
    "origin",
    "instance",
    "action",
    "user_id",
    "room_id",
    "reason",
    "event_id",
    "device_id",
    "outcome",
    "prev_hash",
)

# Fields added since the first format. Hashed only when set (not null): an entry
# without them hashes exactly as it did before they existed, so old chains keep
# verifying and independent additions compose.
OPTIONAL_FIELDS: Sequence[str] = (
    # How the departure or forget happened (docs/audit.md "Routes").
    "via",
    # Who acted, when not the user: the kicker or banner, the admin.
    "actor",
    # The origin_server_ts of the membership event an entry records.
    "event_ts",
)

# How a departure or forget happened: the entry's ``via`` (docs/audit.md "Routes").
VIA_API = "api"  # the module's own leave or forget endpoint
VIA_STATE_API = "state_api"  # PUT /rooms/{roomId}/state/m.room.member/{own id}
VIA_KICK = "kick"  # /kick: by another member (actor), or of oneself
VIA_BAN = "ban"  # banned by another member (actor)
VIA_CLIENT = "client"  # another client route, or one this process cannot see
VIA_DEACTIVATION = "deactivation"  # account deactivation (by the user or an admin)
VIA_ADMIN_ROOM_DELETE = "admin_room_delete"  # admin room deletion or shutdown
VIA_FORGET_ON_LEAVE = "forget_on_leave"  # Synapse's forget_rooms_on_leave
VIA_RECOVERED = "recovered"  # found by the catch-up; the route is not known


def now_ms() -> int:
    """Wall-clock milliseconds, as Synapse stamps events.

    (ModuleApi.get_current_time_msec is newer than the oldest supported Synapse.)
    """
    return int(time.time() * 1000)


def hashed_body(entry: Mapping[str, Any]) -> Dict[str, Any]:
    """What an entry's hash covers: every ENTRY_FIELD, and the OPTIONAL_FIELDS that are set."""
    body = {k: entry[k] for k in ENTRY_FIELDS}
    for k in OPTIONAL_FIELDS:
        if entry.get(k) is not None:
            body[k] = entry[k]
    return body


def entry_hash(entry: Mapping[str, Any]) -> str:
    """The chain hash of an entry: SHA-256 of its canonical JSON, hash and signatures aside."""
    body = hashed_body(entry)
    return encode_base64(hashlib.sha256(encode_canonical_json(body)).digest())


def seal_entry(fields: Mapping[str, Any], origin: str, signing_key: SigningKey) -> Dict[str, Any]:
    """Complete an entry with its hash and the homeserver's signature.

    Args:
        fields: Every name in ENTRY_FIELDS (``origin`` included), and any OPTIONAL_FIELDS.
        origin: The server name to sign as.
        signing_key: The homeserver's signing key.
    """
    entry = hashed_body(fields)
    entry["hash"] = entry_hash(entry)
    signed = sign_json({"hash": entry["hash"], "seq": entry["seq"]}, origin, signing_key)
    entry["signatures"] = signed["signatures"]
    return entry


def verify_key_id(signing_key: SigningKey) -> str:
    return f"{signing_key.alg}:{signing_key.version}"


def verify_keys_from_signing_key(signing_key: SigningKey) -> Dict[str, VerifyKey]:
    return {verify_key_id(signing_key): get_verify_key(signing_key)}


def parse_verify_key(text: str) -> Dict[str, VerifyKey]:
    """Parse ``ed25519:<version> <unpadded base64>``, as published by /_matrix/key/v2/server."""
    try:
        key_id, key_b64 = text.split()
        algorithm, version = key_id.split(":", 1)
        key = decode_verify_key_bytes(key_id, decode_base64(key_b64))
    except Exception as exc:
        raise ValueError(
            f"not a verify key {text!r}: expected 'ed25519:<version> <base64>'"
        ) from exc
    key.alg = algorithm
    key.version = version
    return {key_id: key}


@attr.s(frozen=True, auto_attribs=True)
class VerifyResult:
    """The outcome of checking a chain.

    Attributes:
        checked: How many entries were checked.
        head_hash: The hash of the last good entry, to anchor elsewhere.
        bad_seq: The first entry that failed, or None.
        problem: Why it failed.
    """

    checked: int
    head_hash: str
    bad_seq: Optional[int] = None
    problem: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.bad_seq is None


def iter_verify(
    entries: Iterable[Mapping[str, Any]],
    origin: str,
    verify_keys: Mapping[str, VerifyKey],
) -> Iterator[VerifyResult]:
    """Check entries in seq order, yielding progress after each and stopping at the first bad one.

    Each entry must follow its predecessor (seq + 1, prev_hash = its hash),
    hash to its stored hash and carry a valid signature by ``origin``.
    """
    expected_seq = 1
    prev = GENESIS_HASH
    checked = 0
    for entry in entries:
        seq = entry.get("seq")
        problem = None
        if seq != expected_seq:
            problem = f"expected entry {expected_seq} but found entry {seq}"
        elif entry.get("prev_hash") != prev:
            problem = "prev_hash does not match the previous entry's hash"
        elif entry_hash(entry) != entry.get("hash"):
            problem = "contents do not match the stored hash (the row was edited)"
        else:
            try:
                verify_signed_json(
                    {"hash": entry["hash"], "seq": entry["seq"], "signatures": entry["signatures"]},
                    origin,
                    _only_known_key(entry["signatures"], origin, verify_keys),
                )
            except (SignatureVerifyException, KeyError, TypeError, AttributeError) as exc:
                problem = f"bad signature: {exc}"
        if problem is not None:
            yield VerifyResult(
                checked, prev, seq if isinstance(seq, int) else expected_seq, problem
            )
            return
        checked += 1
        prev = str(entry["hash"])
        expected_seq += 1
        yield VerifyResult(checked, prev)
    if checked == 0:
        yield VerifyResult(0, prev)


def _only_known_key(
    signatures: Mapping[str, Mapping[str, str]], origin: str, verify_keys: Mapping[str, VerifyKey]
) -> VerifyKey:
    for key_id in signatures.get(origin, {}):
        if key_id in verify_keys:
            return verify_keys[key_id]
    raise SignatureVerifyException(
        f"no signature by {origin} with a known key ({', '.join(verify_keys)})"
    )


def verify_chain(
    entries: Iterable[Mapping[str, Any]], origin: str, verify_keys: Mapping[str, VerifyKey]
) -> VerifyResult:
    """Check a whole chain; see iter_verify."""
    *_, last = iter_verify(entries, origin, verify_keys)
    return last
