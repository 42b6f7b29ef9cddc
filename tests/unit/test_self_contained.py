"""The repository stands alone: nothing it tracks reaches outside its own tree."""

import os
import subprocess

from twisted.trial import unittest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Spelled in pieces so that this file does not match itself.
OUTSIDE = ".." + "/shared"
OUTSIDE_PARTS = '"..", "' + 'shared"'


def tracked_files() -> list[str]:
    """The files git tracks; every file under the tree outside a git checkout (an sdist)."""
    try:
        listing = subprocess.run(
            ["git", "-C", REPO_ROOT, "ls-files", "-z"],
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        paths = []
        for directory, dirs, files in os.walk(REPO_ROOT):
            dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"]
            paths += [os.path.relpath(os.path.join(directory, f), REPO_ROOT) for f in files]
        return paths
    return [p for p in listing.decode().split("\0") if p]


class SelfContainedTests(unittest.TestCase):
    def test_no_tracked_file_depends_on_a_sibling_directory(self) -> None:
        """No tracked file (tests, docs, bench, scripts, CI) names the sibling
        directory the Matrix spec used to be read from (dot-dot slash shared),
        as a path or as os.path.join parts: a fresh clone on a machine with
        nothing beside it runs every test and every documented command."""
        files = tracked_files()
        # Something to check: the OpenAPI description that replaced it is tracked.
        self.assertIn(os.path.join("docs", "api", "leaving.yaml"), files)
        offenders = []
        for path in files:
            try:
                with open(os.path.join(REPO_ROOT, path), encoding="utf-8") as f:
                    text = f.read()
            except (UnicodeDecodeError, FileNotFoundError, IsADirectoryError):
                continue  # binary, or deleted from the work tree but not yet from the index
            for needle in (OUTSIDE, OUTSIDE_PARTS):
                if needle in text:
                    line = text[: text.index(needle)].count("\n") + 1
                    offenders.append(f"{path}:{line}")
        self.assertEqual(offenders, [])
