"""The seed every fuzz test of this folder runs with (``FUZZ_SEED`` replays another run)."""
from __future__ import annotations

import os

SEED = int(os.environ.get("FUZZ_SEED", "20261201"))


def examples(default: int) -> int:
    """Examples per test (per operation and mode for the API fuzz); ``FUZZ_EXAMPLES`` overrides."""
    return int(os.environ.get("FUZZ_EXAMPLES", str(default)))
