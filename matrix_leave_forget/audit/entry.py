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
import json
import secrets
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import attr
from signedjson.key import decode_verify_key_bytes, get_verify_key
from signedjson.sign import SignatureVerifyException, sign_json, verify_signed_json
from signedjson.types import SigningKey, VerifyKey
from unpaddedbase64 import decode_base64, encode_base64

from matrix_leave_forget.audit.canonical import encode_canonical

GENESIS_HASH = ""

# Every entry has these fields, hashed even when null, in the order the CLI prints them.
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
    # "2" on entries sealed per group (see seal_entries); absent on the first format.
    "format",
    # Comma-separated names of fields stored JSON-escaped (see escape_text).
    "escaped",
    # For a refused request's reason cut to a prefix: the whole reason's size and hash.
    "reason_bytes",
    "reason_sha256",
    # Refusals by this user not appended individually since their previous entry.
    "suppressed",
    # How the departure or forget happened (docs/audit.md "Routes").
    "via",
    # Who acted, when not the user: the kicker or banner, the admin.
    "actor",
    # The origin_server_ts of the membership event an entry records.
    "event_ts",
    # Format 3: the salted commitment to the entry's free text (see COMMITTED_TEXT_FIELDS).
    "text_commitment",
    # On an ``erase`` entry: the entries whose free text it erased (see erasure_claims).
    "erasure",
    # On a ``purge``/``purged`` entry: what the purge erased and kept (retention.receipt).
    "receipt",
)

# Stored beside an entry but never hashed: the commitment's salt, and when the
# entry's free text was erased (see docs/audit.md "Erasure").
UNHASHED_FIELDS: Sequence[str] = ("text_salt", "text_erased")

# The format marker of group-sealed entries.
FORMAT_GROUP = 2
# Group-sealed, with the free text committed to rather than hashed (see
# commit_text): the text can be erased and the chain still verifies.
FORMAT_COMMITTED = 3

# An entry's free text: what a user typed (a leave reason, a refused request's
# reason prefix and the whole reason's hash). Format 3 hashes a salted
# commitment to them instead of the text, so that deleting the text (erasure)
# leaves the hash intact and a short reason cannot be guessed from the hash.
COMMITTED_TEXT_FIELDS: Sequence[str] = ("reason", "reason_sha256")

# Formats whose entries may be unsigned, covered by a later signature.
GROUP_FORMATS = frozenset({FORMAT_GROUP, FORMAT_COMMITTED})

# The action of an entry recording an erasure of other entries' free text.
ACTION_ERASE = "erase"

# Fields whose text comes from a client (or an admin), and so may hold what
# neither database can store as text: U+0000 (PostgreSQL) or lone surrogates
# (not encodable as UTF-8, on both engines).
CLIENT_TEXT_FIELDS: Sequence[str] = ("user_id", "room_id", "reason", "event_id", "device_id")


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


# -- storing any string -------------------------------------------------------


def needs_escape(text: str) -> bool:
    """Whether text cannot be stored as-is: it holds U+0000 or a lone surrogate."""
    if "\x00" in text:
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def escape_text(text: str) -> str:
    """The reversible, ASCII-only form of text: its JSON string literal, quotes included.

    ``json.loads`` gives the original back exactly, NUL and lone surrogates included.
    """
    return json.dumps(text, ensure_ascii=True)


def unescape_text(stored: str) -> str:
    """The inverse of escape_text."""
    value = json.loads(stored)
    if not isinstance(value, str):
        raise ValueError(f"not an escaped string: {stored[:40]!r}")
    return value


def escape_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """fields with each client text that cannot be stored as-is escaped; ``escaped`` names them.

    Text that can be stored is left alone, so ordinary entries stay readable
    and hash as they always did.
    """
    out = dict(fields)
    names = [
        name
        for name in CLIENT_TEXT_FIELDS
        if isinstance(out.get(name), str) and needs_escape(out[name])
    ]
    for name in names:
        out[name] = escape_text(out[name])
    if names:
        out["escaped"] = ",".join(names)
    return out


def unescape_entry(entry: Mapping[str, Any]) -> dict[str, Any]:
    """An entry with its escaped fields decoded back to what the client sent."""
    out = dict(entry)
    for name in (entry.get("escaped") or "").split(","):
        if name and isinstance(out.get(name), str):
            out[name] = unescape_text(out[name])
    return out


def reason_digest(reason: str) -> tuple[int, str]:
    """(size in bytes, unpadded-base64 SHA-256) of a reason's UTF-8 form.

    Lone surrogates count as their 3-byte (WTF-8) form, so any string has a digest.
    """
    data = reason.encode("utf-8", "surrogatepass")
    return len(data), encode_base64(hashlib.sha256(data).digest())


# -- hashing and signing ------------------------------------------------------


def hashed_body(entry: Mapping[str, Any]) -> dict[str, Any]:
    """What an entry's hash covers: every ENTRY_FIELD, and the OPTIONAL_FIELDS that are set.

    In format 3 the free text (COMMITTED_TEXT_FIELDS) is not hashed: its
    commitment, ``text_commitment``, is.
    """
    body = {k: entry[k] for k in ENTRY_FIELDS}
    for k in OPTIONAL_FIELDS:
        if entry.get(k) is not None:
            body[k] = entry[k]
    if entry.get("format") == FORMAT_COMMITTED:
        for k in COMMITTED_TEXT_FIELDS:
            body.pop(k, None)
        body["reason"] = None
    return body


def text_commitment(salt: str, entry: Mapping[str, Any]) -> str:
    """The salted commitment to an entry's free text: unpadded base64 of
    SHA-256(salt bytes || canonical JSON of the COMMITTED_TEXT_FIELDS, stored form).

    Args:
        salt: Unpadded base64 of 16 random bytes, stored in ``text_salt``.
    """
    text = {k: entry.get(k) for k in COMMITTED_TEXT_FIELDS}
    digest = hashlib.sha256(decode_base64(salt) + encode_canonical(text))
    return encode_base64(digest.digest())


def has_text(entry: Mapping[str, Any]) -> bool:
    """Whether an entry holds free text (COMMITTED_TEXT_FIELDS)."""
    return any(entry.get(k) is not None for k in COMMITTED_TEXT_FIELDS)


def commit_text(fields: Mapping[str, Any]) -> dict[str, Any]:
    """fields in format 3: a fresh salt and the commitment, when there is free text."""
    out = {**fields, "format": FORMAT_COMMITTED}
    if has_text(out):
        out["text_salt"] = encode_base64(secrets.token_bytes(16))
        out["text_commitment"] = text_commitment(out["text_salt"], out)
    return out


def erased_digest(entry: Mapping[str, Any]) -> str:
    """The hash of an entry's hashed body with its free text removed.

    An erasure records it beside the entry's hash: once the text is gone,
    the entry's other fields can still be checked against it.
    """
    body = hashed_body(entry)
    for k in COMMITTED_TEXT_FIELDS:
        body.pop(k, None)
    body["reason"] = None
    return _hash_body(body)


def erasure_claim(entry: Mapping[str, Any]) -> list[Any]:
    """What an ``erase`` entry records of an entry whose text it erases: [seq, hash, digest]."""
    return [entry["seq"], entry["hash"], erased_digest(entry)]


def erasure_claims(entry: Mapping[str, Any]) -> dict[int, tuple[str, str]]:
    """The claims of an ``erase`` entry: {seq: (hash, erased digest)}; {} for other entries.

    Raises:
        ValueError: if ``erasure`` is not a JSON list of [seq, hash, digest].
    """
    if entry.get("action") != ACTION_ERASE or entry.get("erasure") is None:
        return {}
    claims: dict[int, tuple[str, str]] = {}
    for item in json.loads(entry["erasure"]):
        seq, claimed_hash, digest = item
        if not isinstance(seq, int) or not isinstance(claimed_hash, str):
            raise ValueError(f"not an erasure claim: {item!r}")
        claims[seq] = (claimed_hash, str(digest))
    return claims


def stored_text_problem(entry: Mapping[str, Any]) -> str | None:
    """Why a format 3 entry's stored free text does not match its commitment, if it does not.

    Entries of older formats hash their text, and entries whose text was
    erased are checked against their erasure instead (see iter_verify).
    """
    if entry.get("format") != FORMAT_COMMITTED or entry.get("text_erased") is not None:
        return None
    commitment = entry.get("text_commitment")
    if commitment is None:
        if has_text(entry):
            return "free text without a commitment (the row was edited)"
        return None
    salt = entry.get("text_salt")
    if not isinstance(salt, str) or text_commitment(salt, entry) != commitment:
        return "free text does not match its commitment (the row was edited)"
    return None


def erased_entry_problem(
    entry: Mapping[str, Any], erasures: Mapping[int, tuple[int, str, str]]
) -> str | None:
    """Why an entry marked erased is not a valid erasure, if it is not.

    It must hold no free text, and a later ``erase`` entry must record its
    seq, its hash (unchanged, so it still links and its signature holds)
    and the digest of its other fields (erased_digest).

    Args:
        erasures: {seq: (erase entry's seq, hash, digest)} from every erase entry.
    """
    if has_text(entry) or entry.get("text_salt") is not None:
        return "marked erased but still holds free text"
    claim = erasures.get(entry["seq"])
    if claim is None:
        return "free text removed without an erasure record (the row was edited)"
    erase_seq, claimed_hash, digest = claim
    if erase_seq <= entry["seq"]:
        return f"erasure record {erase_seq} precedes the entry it erases"
    if claimed_hash != entry.get("hash"):
        return f"hash differs from the one erasure {erase_seq} recorded"
    if erased_digest(entry) != digest:
        return f"fields differ from those erasure {erase_seq} recorded (the row was edited)"
    return None


def content_problem(
    entry: Mapping[str, Any], erasures: Mapping[int, tuple[int, str, str]]
) -> str | None:
    """Why an entry's contents do not match its stored hash, if they do not.

    An entry whose free text was erased is checked against its erasure
    record; a format 3 entry's text against its commitment.
    """
    if entry.get("text_erased") is not None:
        problem = erased_entry_problem(entry, erasures)
        if problem is not None or entry.get("format") != FORMAT_COMMITTED:
            return problem
    if entry_hash(entry) != entry.get("hash"):
        return "contents do not match the stored hash (the row was edited)"
    if entry.get("action") == ACTION_ERASE:
        return erase_record_problem(entry, erasures)
    return stored_text_problem(entry)


def erase_record_problem(
    entry: Mapping[str, Any], erasures: Mapping[int, tuple[int, str, str]]
) -> str | None:
    """Why an ``erase`` entry of the chain disagrees with the erasures verify was given.

    Verify is given every erase entry's claims up front (an erased entry
    comes before its erasure); each must be the chain's own, read here.
    """
    try:
        claims = erasure_claims(entry)
    except (ValueError, TypeError) as exc:
        return f"erasure record cannot be read: {exc}"
    for seq, (claimed_hash, digest) in claims.items():
        if erasures.get(seq) != (entry["seq"], claimed_hash, digest):
            return f"erasure record of entry {seq} differs from the one checked"
    if _record_size(erasures, entry["seq"]) != len(claims):
        return "erasure record holds fewer entries than the erasures checked against it"
    return None


class ErasureIndex(dict[int, tuple[int, str, str]]):
    """{erased seq: (erase entry's seq, hash, digest)}, with each erase entry's claim count."""

    _sizes: Counter[int] | None = None

    def record_size(self, erase_seq: int) -> int:
        if self._sizes is None:
            self._sizes = Counter(claim[0] for claim in self.values())
        return self._sizes[erase_seq]


def _record_size(erasures: Mapping[int, tuple[int, str, str]], erase_seq: int) -> int:
    if isinstance(erasures, ErasureIndex):
        return erasures.record_size(erase_seq)
    return sum(1 for claim in erasures.values() if claim[0] == erase_seq)


def erasures_from_entries(entries: Iterable[Mapping[str, Any]]) -> ErasureIndex:
    """{erased seq: (erase entry's seq, hash, digest)} from the ``erase`` entries given."""
    out = ErasureIndex()
    for entry in entries:
        for seq, (claimed_hash, digest) in erasure_claims(entry).items():
            out[seq] = (int(entry["seq"]), claimed_hash, digest)
    return out


def entry_hash(entry: Mapping[str, Any]) -> str:
    """The chain hash of an entry: SHA-256 of its canonical JSON, hash and signatures aside."""
    return _hash_body(hashed_body(entry))


def _hash_body(body: Mapping[str, Any]) -> str:
    # encode_canonical is canonicaljson's encoding, byte for byte (audit/canonical.py).
    return encode_base64(hashlib.sha256(encode_canonical(body)).digest())


def chain_entry(fields: Mapping[str, Any]) -> dict[str, Any]:
    """An entry with its hash and no signature yet (``signatures`` is empty).

    Format 3 entries keep their free text and salt beside the hashed body.
    """
    entry = hashed_body(fields)
    entry["hash"] = _hash_body(entry)
    if fields.get("format") == FORMAT_COMMITTED:
        for k in (*COMMITTED_TEXT_FIELDS, "text_salt"):
            if fields.get(k) is not None:
                entry[k] = fields[k]
    entry["signatures"] = {}
    return entry


def sign_entry(entry: dict[str, Any], origin: str, signing_key: SigningKey) -> None:
    """Sign an entry's ``{"hash", "seq"}`` with the homeserver's key, in place.

    Through ``prev_hash`` the hash covers every earlier entry, so this
    signature authenticates the chain up to and including this entry.
    """
    signed = sign_json({"hash": entry["hash"], "seq": entry["seq"]}, origin, signing_key)
    entry["signatures"] = signed["signatures"]


def seal_entry(fields: Mapping[str, Any], origin: str, signing_key: SigningKey) -> dict[str, Any]:
    """Complete an entry with its hash and the homeserver's signature.

    Args:
        fields: Every name in ENTRY_FIELDS (``origin`` included), and any OPTIONAL_FIELDS.
        origin: The server name to sign as.
        signing_key: The homeserver's signing key.
    """
    entry = chain_entry(fields)
    sign_entry(entry, origin, signing_key)
    return entry


def seal_entries(
    many: Sequence[Mapping[str, Any]],
    seq: int,
    prev_hash: str,
    origin: str,
    signing_key: SigningKey,
) -> list[dict[str, Any]]:
    """Chain entries after (seq, prev_hash) in the group format: one signature, on the last.

    Every entry carries ``format: 3``: it may be unsigned, covered by the next
    signed entry, and its free text is committed to, not hashed (commit_text).
    The group is written in one transaction, so a valid chain never ends on
    an unsigned entry.

    Args:
        many: The entries' fields, without seq and prev_hash.
        seq: The head's seq (0 for an empty log).
        prev_hash: The head's hash.
    """
    entries: list[dict[str, Any]] = []
    for fields in many:
        seq += 1
        entry = chain_entry(commit_text({**fields, "seq": seq, "prev_hash": prev_hash}))
        prev_hash = entry["hash"]
        entries.append(entry)
    if entries:
        sign_entry(entries[-1], origin, signing_key)
    return entries


# -- keys ---------------------------------------------------------------------


def verify_key_id(signing_key: SigningKey) -> str:
    return f"{signing_key.alg}:{signing_key.version}"


def verify_keys_from_signing_key(signing_key: SigningKey) -> dict[str, VerifyKey]:
    return {verify_key_id(signing_key): get_verify_key(signing_key)}


def parse_verify_key(text: str) -> dict[str, VerifyKey]:
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


def parse_old_signing_keys(value: Any) -> tuple[dict[str, VerifyKey], dict[str, int]]:
    """Synapse's ``old_signing_keys``: verify keys, and when each expired.

    ``{"ed25519:<version>": {"key": "<base64>", "expired_ts": <ms>}}``, as in
    homeserver.yaml. Synapse requires ``expired_ts``; one missing here is a key
    with no known expiry.

    Raises:
        ValueError: naming the key that does not parse.
    """
    if value is None:
        return {}, {}
    if not isinstance(value, Mapping):
        raise ValueError("old_signing_keys must be a mapping")
    keys: dict[str, VerifyKey] = {}
    expiry: dict[str, int] = {}
    for key_id, data in value.items():
        try:
            algorithm, version = str(key_id).split(":", 1)
            key = decode_verify_key_bytes(key_id, decode_base64(data["key"]))
            expired_ts = data.get("expired_ts")
            if expired_ts is not None and (
                isinstance(expired_ts, bool) or not isinstance(expired_ts, int)
            ):
                raise ValueError("expired_ts must be an integer of milliseconds")
        except Exception as exc:
            raise ValueError(f"old_signing_keys: cannot parse {key_id}: {exc}") from exc
        key.alg, key.version = algorithm, version
        keys[str(key_id)] = key
        if expired_ts is not None:
            expiry[str(key_id)] = expired_ts
    return keys, expiry


def parse_head(text: str) -> tuple[int, str]:
    """Parse ``SEQ:HASH`` (as verify prints a head) into (seq, hash).

    Raises:
        ValueError: if text is not a positive seq, a colon and a hash.
    """
    seq_text, sep, head_hash = text.strip().partition(":")
    if not sep or not seq_text.isdigit() or int(seq_text) < 1 or not head_hash:
        raise ValueError(f"not a head {text!r}: expected SEQ:HASH, e.g. 1234:{'A' * 43}")
    return int(seq_text), head_hash


# -- verifying ------------------------------------------------------------------


@attr.s(frozen=True, auto_attribs=True)
class VerifyResult:
    """The outcome of checking a chain.

    Attributes:
        checked: How many entries were checked (hash link and a covering signature).
        head_hash: The hash of the last good entry, to anchor elsewhere.
        bad_seq: The first entry that failed, or None.
        problem: Why it failed.
        heads_matched: How many expected heads (recorded heads, checkpoints) were found.
        erased: How many entries checked had their free text erased (each
            against its erasure record): erased, not tampered with.
    """

    checked: int
    head_hash: str
    bad_seq: int | None = None
    problem: str | None = None
    heads_matched: int = 0
    erased: int = 0

    @property
    def ok(self) -> bool:
        return self.bad_seq is None

    @property
    def head_seq(self) -> int:
        """The seq of the last good entry (0 for none): entries are 1..checked."""
        return self.checked


def iter_verify(
    entries: Iterable[Mapping[str, Any]],
    origin: str,
    verify_keys: Mapping[str, VerifyKey],
    key_expiry: Mapping[str, int] | None = None,
    expected_heads: Iterable[tuple[int, str]] = (),
    after: tuple[int, str] | None = None,
    after_ts: int | None = None,
    erasures: Mapping[int, tuple[int, str, str]] | None = None,
    check_missing: bool = True,
) -> Iterator[VerifyResult]:
    """Check entries in seq order, yielding progress and stopping at the first bad one.

    Each entry must follow its predecessor (seq + 1, prev_hash = its hash) and
    hash to its stored hash. An entry of the first format must carry a valid
    signature by ``origin``; an entry with ``format: 2`` may be unsigned, and
    is then covered by the next signed entry (whose hash covers it through the
    links): a chain that ends on unsigned entries fails.

    A signature by a key in ``key_expiry`` fails once the chain has reached
    that key's expiry: the signed entry, or any entry before it, has a ``ts``
    at or after ``expired_ts``.

    Every (seq, hash) in ``expected_heads`` — a head recorded earlier, a
    checkpoint — must be in the chain with that hash: a different hash at seq
    fails there, and a chain that ends before seq is reported as truncated.

    With ``after`` = (seq, hash), a signed head checked earlier, ``entries``
    start at the entry after it and the check goes on from there as if entries
    1 to seq had just been checked (the caller makes sure the chain still
    holds that head); expected heads at or before it are the caller's too.
    ``after_ts``, the head's ts, is where key expiry starts counting.

    An entry whose free text was erased is checked against its erasure
    record: ``erasures`` (erasures_from_entries of every ``erase`` entry, read
    before the chain, as the record follows the entry) must hold it, and the
    record must be the chain's own when the chain reaches it
    (content_problem, docs/audit.md "Erasure"); without ``check_missing``
    (a chunk of the chain) a record beyond the entries is the caller's to find.

    A result is yielded after each entry that is covered by a signature.
    """
    expiry = key_expiry or {}
    start_seq, start_hash = after if after is not None else (0, GENESIS_HASH)
    erasures = erasures or {}
    erased = 0
    heads: dict[int, str] = {}
    for head_seq, head_hash in expected_heads:
        if head_seq > start_seq:
            heads.setdefault(head_seq, head_hash)
    matched = 0
    expected_seq = start_seq + 1
    prev = start_hash
    signed_hash = start_hash
    checked = start_seq
    pending: list[int] = []  # unsigned entries waiting for a signature
    max_ts = after_ts
    for entry in entries:
        get = entry.get
        seq = get("seq")
        problem = None
        if seq != expected_seq:
            problem = f"expected entry {expected_seq} but found entry {seq}"
        elif get("prev_hash") != prev:
            problem = "prev_hash does not match the previous entry's hash"
        elif (content := content_problem(entry, erasures)) is not None:
            problem = content
        elif seq in heads and heads[seq] != get("hash"):
            problem = f"hash differs from the expected head {seq}:{heads[seq]}"
        else:
            ts = get("ts")
            if isinstance(ts, int) and (max_ts is None or ts > max_ts):
                max_ts = ts
            signatures = get("signatures")
            erased += get("text_erased") is not None
            if not signatures and get("format") in GROUP_FORMATS:
                pending.append(expected_seq)
            else:
                problem = signature_problem(entry, origin, verify_keys, expiry, max_ts)
        if problem is not None:
            bad = seq if isinstance(seq, int) else expected_seq
            if pending and problem.startswith("bad signature"):
                # The bad signature was to cover the pending entries too.
                bad = pending[0]
                problem += f" (entry {seq}, which was to cover entries {pending[0]} to {seq})"
            yield VerifyResult(checked, signed_hash, bad, problem, matched, erased)
            return
        if seq in heads:
            matched += 1
        prev = str(entry["hash"])
        expected_seq += 1
        if pending and pending[-1] == seq:
            continue
        checked = expected_seq - 1
        pending = []
        signed_hash = prev
        yield VerifyResult(checked, signed_hash, heads_matched=matched, erased=erased)
    if pending:
        yield VerifyResult(
            checked,
            signed_hash,
            pending[0],
            f"entries {pending[0]} to {pending[-1]} are not covered by any signature "
            "(a group-sealed chain ends on a signed entry)",
            matched,
            erased,
        )
        return
    beyond = sorted(s for s in heads if s > checked)
    if beyond:
        yield VerifyResult(
            checked,
            signed_hash,
            checked + 1,
            f"the chain ends at entry {checked}, before the expected head "
            f"{beyond[0]}:{heads[beyond[0]]} (truncated)",
            matched,
            erased,
        )
        return
    if check_missing and (missing := missing_erasure(erasures, checked)) is not None:
        yield VerifyResult(checked, signed_hash, missing[0], missing[1], matched, erased)
        return
    if checked == start_seq:
        yield VerifyResult(checked, signed_hash, heads_matched=matched, erased=erased)


def missing_erasure(
    erasures: Mapping[int, tuple[int, str, str]], checked: int
) -> tuple[int, str] | None:
    """(seq, problem) for a checked erased entry whose erasure record the chain lacks."""
    for seq, (erase_seq, _hash, _digest) in sorted(erasures.items()):
        if seq <= checked < erase_seq:
            return seq, f"its erasure record, entry {erase_seq}, is not in the chain"
    return None


def signature_problem(
    entry: Mapping[str, Any],
    origin: str,
    verify_keys: Mapping[str, VerifyKey],
    expiry: Mapping[str, int],
    max_ts: int | None,
) -> str | None:
    try:
        key_id = _known_key_id(entry["signatures"], origin, verify_keys)
        verify_signed_json(
            {"hash": entry["hash"], "seq": entry["seq"], "signatures": entry["signatures"]},
            origin,
            verify_keys[key_id],
        )
    except (SignatureVerifyException, KeyError, TypeError, AttributeError) as exc:
        return f"bad signature: {exc}"
    expired_ts = expiry.get(key_id)
    if expired_ts is not None and max_ts is not None and max_ts >= expired_ts:
        return (
            f"bad signature: signed by {key_id}, which expired at {expired_ts} "
            f"(old_signing_keys), but the chain had reached ts {max_ts}"
        )
    return None


def _known_key_id(
    signatures: Mapping[str, Mapping[str, str]], origin: str, verify_keys: Mapping[str, VerifyKey]
) -> str:
    for key_id in signatures.get(origin, {}):
        if key_id in verify_keys:
            return key_id
    raise SignatureVerifyException(
        f"no signature by {origin} with a known key ({', '.join(verify_keys)})"
    )


def verify_chain(
    entries: Iterable[Mapping[str, Any]],
    origin: str,
    verify_keys: Mapping[str, VerifyKey],
    key_expiry: Mapping[str, int] | None = None,
    expected_heads: Iterable[tuple[int, str]] = (),
    erasures: Mapping[int, tuple[int, str, str]] | None = None,
) -> VerifyResult:
    """Check a whole chain; see iter_verify.

    Without ``erasures``, they are read from the entries themselves (a list
    is read twice).
    """
    if erasures is None:
        entries = list(entries)
        erasures = erasures_from_entries(entries)
    *_, last = iter_verify(
        entries, origin, verify_keys, key_expiry, expected_heads, erasures=erasures
    )
    return last
