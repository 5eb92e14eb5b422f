"""Writing a benchmark's report (host side)."""

from __future__ import annotations

import json
import os
from typing import Any


def write_json(path: str, payload: dict[str, Any]) -> None:
    """Write `payload` as indented JSON, creating the file's folder; unknown types as str."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(payload, fh, indent=1, default=str)
