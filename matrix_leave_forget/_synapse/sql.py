"""Limits and values shared by the queries on Synapse's tables."""

# Room ids per IN (...) list: well under SQLite's oldest variable limit (999).
IN_LIST_MAX = 500

# Memberships that keep a room alive for a local user: the room is not
# forgotten by all, a forget is refused, a purge must wait. The one definition,
# for the rules and for every query on Synapse's membership tables.
LIVE_MEMBERSHIPS = frozenset({"join", "invite", "knock"})
LIVE = tuple(sorted(LIVE_MEMBERSHIPS))
# As SQL literals, for a statement whose other arguments are its own
# (constants from the line above, never user input).
LIVE_SQL = ", ".join(f"'{membership}'" for membership in LIVE)
