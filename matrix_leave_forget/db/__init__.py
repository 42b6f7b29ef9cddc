"""The module's own tables: schema, migrations, statements and the store."""
