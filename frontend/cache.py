"""Where bitpass keeps what it can recompute: latency tables, trained test weights, error logs."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$BITPASS_CACHE_DIR``, else ``$XDG_CACHE_HOME/bitpass``, else ``~/.cache/bitpass`` (not created here)."""
    explicit = os.environ.get("BITPASS_CACHE_DIR")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bitpass"
