"""This process's resident set (what the OS charges and kills by: MLX's buffers and cache, the Python heap, the
libraries, the tokenizer), now or at its peak, from the one place that reads it."""
import resource
import sys
from pathlib import Path


def resident_bytes(peak=False):
    """Bytes this process holds now (VmRSS), or at its peak (VmHWM). Where /proc is missing (macOS) only the peak is
    known, and it is returned for both: never less than the present value."""
    key = "VmHWM" if peak else "VmRSS"
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    most = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return most if sys.platform == "darwin" else most * 1024  # macOS counts bytes, Linux kilobytes


def rss_mb():
    """Peak resident set size of this process in MB."""
    return resident_bytes(peak=True) / 2 ** 20
