"""What the benchmark scripts share (they run as scripts, so this directory is on their path)."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def machine() -> str:
    """The machine line every benchmark prints: CPU model and count, kernel, Python."""
    model = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return f"{model}, {os.cpu_count()} CPUs, Linux {platform.release()}, Python {platform.python_version()}"
