"""The training loop's CPU malloc setting (docs/METHOD.md §8, "CPU memory")."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

PROBE = """
import resource, sys, torch
from weighted_mtp.train.loop import keep_freed_cpu_memory
if sys.argv[1] == "keep":
    assert keep_freed_cpu_memory()
sizes = [(1 << 20) * k for k in (3, 5, 2, 4, 6, 1, 5, 3)]  # floats: 4-24 MiB buffers
def step():  # several live buffers of varying sizes, written, then freed, as a training step
    held = [torch.ones(n) for n in sizes]
    del held
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str, **env: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         check=True, env={**os.environ, **env})  # fmt: skip
    return int(out.stdout.strip())


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_freed_buffers_are_reused_instead_of_faulted_in_again():
    # The control holds glibc's default threshold (128 KiB) fixed: left to itself, glibc raises
    # it after the first large free, and whether freed memory then goes back to the system
    # depends on where the address space put the heap (one run in three kept it here).
    default = _faults("default", MALLOC_MMAP_THRESHOLD_="131072")
    kept = _faults("keep")
    # 10 steps of 116 MiB written: about 29,700 pages each when freed memory goes back
    assert default > 10 * 29_000 // 4, default
    assert kept < default / 20, (kept, default)
