"""The media a room's events reference: the reference index (docs/retention.md "Media")."""
