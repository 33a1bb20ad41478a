"""How every entry point ends: its exit status, or one line naming the problem and exit 2 for a user error."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NoReturn


def run_cli(main: Callable[[], int | None], *user_errors: type[BaseException]) -> NoReturn:
    """Exit with `main()`'s status; one of `user_errors` (a missing file, a bad key: their messages name the
    file or key and the fix) prints `error: ...` on stderr and exits 2 without a traceback."""
    try:
        code = main()
    except user_errors as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)
