"""Limits shared by the queries on Synapse's tables."""

# Room ids per IN (...) list: well under SQLite's oldest variable limit (999).
IN_LIST_MAX = 500
