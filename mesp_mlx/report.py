"""Measurements a run reports about itself: process memory next to MLX's own counters."""
import sys
from pathlib import Path


def rss_mb():
    """Peak resident set size of this process in MB (what the OS charges, MLX's cache and the Python heap included)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024
