"""The history guard: the spec's history promises kept on client reads."""
