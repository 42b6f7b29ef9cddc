"""The module's URL prefixes, shared by the HTTP side and its clients (the CLI)."""

# The admin API (docs/routes.md "Admin API"), reachable in both mount modes.
ADMIN_PREFIX = "/_synapse/client/leave_forget/v1/admin"
