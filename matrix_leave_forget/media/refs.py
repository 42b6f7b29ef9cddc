"""Which media an event's content references, as the server can see it.

Only the fields Matrix clients put media in are read (an encrypted event's
content is ciphertext: nothing is found there, which is why a purged
encrypted room keeps its media).
"""

import re
from collections.abc import Mapping
from typing import Any

# Kinds of reference (leave_forget_media_refs.kind).
KIND_CONTENT = "content"  # url / file.url of a message or sticker
KIND_THUMBNAIL = "thumbnail"  # info.thumbnail_url / info.thumbnail_file.url
KIND_HTML = "html"  # <img src="mxc://..."> in formatted_body
KIND_ROOM_AVATAR = "room_avatar"  # m.room.avatar's url
KIND_PROFILE = "profile"  # a member event's avatar_url (a user's profile)

# server name and media id; both bounded so a hostile event cannot make a
# row no index can hold.
_MXC = re.compile(r"mxc://([A-Za-z0-9.\-:\[\]_]{1,255})/([A-Za-z0-9_\-=.]{1,255})", re.ASCII)
# The src of an <img> tag, quoted or not, in any case.
_IMG_SRC = re.compile(r"<img\b[^>]*?\bsrc\s*=\s*[\"']?(mxc://[^\"'\s>]+)", re.IGNORECASE)
# formatted_body is at most an event (64 KiB); a bound on the scan all the same.
_MAX_HTML_CHARS = 65536

MediaRef = tuple[str, str, str]  # (server name, media id, kind)


def parse_mxc(value: Any) -> tuple[str, str] | None:
    """(server name, media id) of an ``mxc://`` URI, or None if it is not one."""
    if not isinstance(value, str):
        return None
    match = _MXC.fullmatch(value)
    return (match.group(1), match.group(2)) if match else None


def _add(refs: set[MediaRef], value: Any, kind: str) -> None:
    parsed = parse_mxc(value)
    if parsed is not None:
        refs.add((parsed[0], parsed[1], kind))


def _file_url(value: Any) -> Any:
    return value.get("url") if isinstance(value, Mapping) else None


def _content_refs(content: Mapping[str, Any], refs: set[MediaRef]) -> None:
    _add(refs, content.get("url"), KIND_CONTENT)
    _add(refs, _file_url(content.get("file")), KIND_CONTENT)
    info = content.get("info")
    if isinstance(info, Mapping):
        _add(refs, info.get("thumbnail_url"), KIND_THUMBNAIL)
        _add(refs, _file_url(info.get("thumbnail_file")), KIND_THUMBNAIL)
    html = content.get("formatted_body")
    if isinstance(html, str) and "mxc://" in html:
        for src in _IMG_SRC.findall(html[:_MAX_HTML_CHARS]):
            _add(refs, src, KIND_HTML)


def media_refs(event_type: str, content: Any) -> set[MediaRef]:
    """The media an event's content references.

    Args:
        event_type: The event's type.
        content: Its content (anything: events from federation are not trusted).

    Returns:
        (server name, media id, kind) of each reference; a member event's
        avatar is a ``profile`` reference, a room avatar a ``room_avatar`` one.
    """
    refs: set[MediaRef] = set()
    if not isinstance(content, Mapping):
        return refs
    if event_type == "m.room.member":
        _add(refs, content.get("avatar_url"), KIND_PROFILE)
        return refs
    if event_type == "m.room.avatar":
        _add(refs, content.get("url"), KIND_ROOM_AVATAR)
        info = content.get("info")
        if isinstance(info, Mapping):
            _add(refs, info.get("thumbnail_url"), KIND_THUMBNAIL)
        return refs
    _content_refs(content, refs)
    # An edit carries the new media in m.new_content.
    new_content = content.get("m.new_content")
    if isinstance(new_content, Mapping):
        _content_refs(new_content, refs)
    return refs
