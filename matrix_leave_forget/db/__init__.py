"""The module's own tables: schema, migrations, statements, group commit, media tables."""
