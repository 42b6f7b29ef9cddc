"""What every part of the CLI shares: its name, exit statuses and the operator's errors."""

PROG = "matrix-leave-forget"

EXIT_OK = 0
EXIT_VERIFY_FAILED = 1
EXIT_ERROR = 2
# What a shell reports for a process killed by SIGPIPE (`... | head`).
EXIT_BROKEN_PIPE = 141


class CliError(Exception):
    """A problem the operator must fix (config, database, usage): one line, exit 2."""


def one_line(text: str) -> str:
    """Collapse a driver's or parser's multi-line message onto one line."""
    return " ".join(str(text).split())
