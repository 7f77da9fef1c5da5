"""Property-based hostile inputs for both Python APIs (generator: hostile.py).

* CPU (runs everywhere, CI included): random wrong shapes, dtypes, strides, offsets, zero-sized
  dims, non-array objects and out-of-range scalars thrown at flash_mla_with_kvcache,
  get_mla_metadata and the flash_mla.ops functions with CPU arrays (torch tensors and NumPy
  arrays). Every call must raise TypeError / ValueError / NotImplementedError / RuntimeError
  with a message: never another exception, never a crash, never a silent return.
* GPU: the same generator with CUDA tensors (calls may succeed: then outputs must be finite),
  out-of-range block_table entries and lengths included, a device synchronisation after every
  example. It runs in a subprocess so that a crash fails this test instead of the session.

Skipped without hypothesis (pip install hypothesis). Examples are derandomized: reproducible.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

hypothesis = pytest.importorskip("hypothesis")

import hostile  # noqa: E402  (tests/python is on sys.path: conftest's folder)

CPU_EXAMPLES = int(os.environ.get("FLASH_MLA_HOSTILE_CPU_EXAMPLES", "150"))
GPU_EXAMPLES = int(os.environ.get("FLASH_MLA_HOSTILE_GPU_EXAMPLES", "120"))


@pytest.mark.parametrize("api", list(hostile.EXAMPLES))
def test_hostile_inputs_cpu(api):
    hostile.make_test(api, "cpu", CPU_EXAMPLES)()


@pytest.mark.requires_gpu
@pytest.mark.parametrize("api", list(hostile.EXAMPLES))
def test_hostile_inputs_gpu_subprocess(api):
    """One subprocess per API, so a crash is charged to the API that caused it."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hostile.py")
    proc = subprocess.run([sys.executable, script, "--device", "cuda", "--examples", str(GPU_EXAMPLES),
                           "--apis", api], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    tail = proc.stdout[-6000:]
    assert proc.returncode == 0, f"hostile GPU run failed (rc {proc.returncode}):\n{tail}"
    assert "hostile: all passed" in proc.stdout, tail
