"""``python -m matrix_leave_forget.cli``: the same as the console script."""

import sys

from matrix_leave_forget.cli.app import main

sys.exit(main())
