"""fdfast.hostmem (runtime.malloc): glibc keeps freed memory in a CPU training process, so steps stop faulting
their pages in again. Each case runs in a fresh interpreter: malloc settings are process-wide and permanent."""
import json
import os
import platform
import subprocess
import sys

import pytest
import torch

from fdfast import hostmem
from fdfast.config import Config
from fdfast.errors import FDFastError

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# In a fresh process: where glibc puts a 30 MiB block (mallinfo2: hblkhd = bytes in mmapped blocks), and the page
# faults of a training step's allocation pattern in small (a dozen 1-12 MiB tensors live at once, then all
# freed; 20 rounds after 3 warm-up rounds).
PROBE = r"""
import ctypes, json, resource, sys, torch
from fdfast import hostmem
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks "
                "fordblks keepcost".split()]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
info = hostmem.configure(sys.argv[1], torch.device(sys.argv[2]))
mapped = libc.mallinfo2().hblkhd
block = torch.empty(30 << 18)
mapped_for_block = libc.mallinfo2().hblkhd - mapped
del block
kept_after_free = libc.mallinfo2().fordblks
def rnd():
    xs = [torch.empty(n << 18).fill_(1.0) for n in range(1, 13)]
    del xs
for _ in range(3):
    rnd()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    rnd()
print(json.dumps({"info": info, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before,
                  "mapped_for_block": mapped_for_block, "kept_after_free": kept_after_free}))
"""


def probe(setting: str, device: str = "cpu", **env) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    done = subprocess.run([sys.executable, "-c", PROBE, setting, device], env={**clean, **env},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_auto_keeps_freed_memory_and_stops_the_page_faults():
    default, auto = probe("default"), probe("auto")
    assert default["info"] == {"setting": "default", "applied": False,
                               "why": "runtime.malloc=default: the C library's own settings"}
    assert auto["info"]["applied"] is True and "mmap threshold 32 MiB" in auto["info"]["why"]
    mib = 1 << 20
    # glibc's defaults map a fresh 30 MiB block (and unmap it on free: every use faults its pages in again);
    # auto serves it from the heap and keeps it there once freed
    assert default["mapped_for_block"] >= 30 * mib and auto["mapped_for_block"] == 0, (default, auto)
    assert auto["kept_after_free"] >= 30 * mib, auto
    # 20 rounds of 78 MiB: with auto nothing is faulted in again (the defaults vary: 0 or ~170k faults, by
    # where glibc's heap top happens to end)
    assert auto["faults"] < 500, auto


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_the_users_own_malloc_settings_are_kept():
    got = probe("auto", MALLOC_TRIM_THRESHOLD_="131072")
    assert got["info"]["applied"] is False and "MALLOC_TRIM_THRESHOLD_ is set" in got["info"]["why"]
    got = probe("auto", GLIBC_TUNABLES="glibc.malloc.trim_threshold=131072")
    assert got["info"]["applied"] is False and "GLIBC_TUNABLES" in got["info"]["why"]


def test_cuda_runs_and_bad_settings():
    got = hostmem.configure("auto", torch.device("cuda"))  # decided from the device alone: no GPU needed
    assert got["applied"] is False and got["why"].startswith("cuda run")
    with pytest.raises(ValueError, match="runtime.malloc must be one of"):
        hostmem.configure("jemalloc", torch.device("cpu"))
    with pytest.raises(FDFastError, match="runtime.malloc"):
        Config.from_dict({"runtime": {"malloc": "jemalloc"}})
