"""The signed, hash-chained audit log: entry format, the log, checkpoints, refusals."""
