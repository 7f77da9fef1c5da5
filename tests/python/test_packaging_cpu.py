"""Packaging checks that need no GPU: one version everywhere, ``python -m flash_mla``, the demo's
host-side parts, and the PTX of the portable kernel embedded in the compiled module (what lets
GPUs newer than the build's architectures JIT-compile it)."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import flash_mla

ROOT = Path(__file__).resolve().parents[2]


def _pyproject_version() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    match = re.search(r'^version = "([^"]+)"', text, re.MULTILINE)
    assert match, "pyproject.toml has no version line"
    return match.group(1)


def _build_info():
    try:
        from flash_mla import _build_info
    except ImportError:
        pytest.skip("flash_mla/_build_info.py is missing: the package was not installed by the CMake build")
    return _build_info


def test_version_is_declared_once():
    version = _pyproject_version()
    assert flash_mla.__version__ == version
    assert _build_info().version == version  # what CMake read from pyproject.toml
    cmake = (ROOT / "CMakeLists.txt").read_text()
    assert not re.search(r"project\(flash_mla VERSION [0-9]", cmake), "CMakeLists.txt must read the version"
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert f"## {version}" in changelog, "CHANGELOG.md has no section for the current version"


def test_build_embeds_ptx_of_plain_architectures():
    info = _build_info()
    for arch in info.cuda_archs:
        if arch.isdigit():
            assert f"-gencode=arch=compute_{arch},code=compute_{arch}" in info.gencode_flags
        assert f"-gencode=arch=compute_{arch},code=sm_{arch}" in info.gencode_flags


def _run_main(*args, env=None):
    return subprocess.run([sys.executable, "-m", "flash_mla", *args], capture_output=True, text=True,
                          timeout=300, cwd=str(Path.home()) if Path.home().is_dir() else None, env=env)


def test_python_m_flash_mla_reports_the_build():
    proc = _run_main()
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"flash-mla {flash_mla.__version__}"
    text = proc.stdout
    info = _build_info()
    assert f"build:    CUDA {info.cuda_version}, architectures {';'.join(info.cuda_archs)}" in text
    assert f"CUTLASS:  {info.cutlass_version}" in text and info.cutlass_version != "unknown"
    assert f"torch:    {torch.__version__}" in text
    assert "flash_mla._C cannot be imported" not in text
    if torch.cuda.is_available():
        assert text.count("kernel 'auto' -> ") == torch.cuda.device_count()
    else:
        assert "GPUs:     none found" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_demo_without_gpu_says_so():
    proc = _run_main("--demo")
    assert proc.returncode == 2
    assert "no CUDA GPU found" in proc.stdout


def test_demo_check_accepts_the_reference_and_rejects_a_wrong_result():
    from flash_mla.__main__ import check_demo_result, make_demo_inputs
    from flash_mla.reference import mla_decode_reference

    q, k_cache, block_table, seqlens = make_demo_inputs(5, 2, 16, 1, 150, torch.bfloat16, seed=1)
    assert seqlens.tolist() == [75, 112, 150, 188, 225]
    out, lse = mla_decode_reference(q, k_cache, block_table, seqlens, 512, None, True)
    ok, line = check_demo_result(out.to(torch.bfloat16), lse, q, k_cache, block_table, seqlens)
    assert ok, line
    ok, line = check_demo_result((out * 1.05).to(torch.bfloat16), lse, q, k_cache, block_table, seqlens)
    assert not ok and "FAIL" in line


def _find_cuobjdump():
    """cuobjdump from the PATH, the CUDA toolkit, or the nvidia-cuda-cuobjdump package."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and os.access(os.path.join(root, "bin", "cuobjdump"), os.X_OK):
            return os.path.join(root, "bin", "cuobjdump")
    try:
        from importlib.metadata import PackageNotFoundError, files
        try:
            for f in files("nvidia-cuda-cuobjdump") or ():
                if str(f).endswith("bin/cuobjdump"):
                    path = str(f.locate())
                    if os.access(path, os.X_OK):
                        return path
        except PackageNotFoundError:
            pass
    except ImportError:  # pragma: no cover
        pass
    return None


def test_compiled_module_carries_portable_ptx():
    """The portable kernel's PTX (compute_80 by default) is in flash_mla._C, so GPUs without
    machine code in the build (sm_100, sm_120, ...) JIT-compile it instead of failing."""
    info = _build_info()
    plain = [a for a in info.cuda_archs if a.isdigit()]
    if not plain:
        pytest.skip(f"this build has no plain architecture (FLASH_MLA_CUDA_ARCHS={';'.join(info.cuda_archs)}), "
                    "hence no PTX by design")
    tool = _find_cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump: not on the PATH, not in CUDA_HOME/bin, and the nvidia-cuda-cuobjdump "
                    "package is not installed (pip install '.[test]' brings it)")
    spec = importlib.util.find_spec("flash_mla._C")
    assert spec is not None and spec.origin, "flash_mla._C not found"
    ptx = subprocess.run([tool, "--list-ptx", spec.origin], capture_output=True, text=True, timeout=300)
    assert ptx.returncode == 0, ptx.stderr
    elf = subprocess.run([tool, "--list-elf", spec.origin], capture_output=True, text=True, timeout=300)
    assert elf.returncode == 0, elf.stderr
    for arch in plain:
        assert f".sm_{arch}.ptx" in ptx.stdout, f"no compute_{arch} PTX in {spec.origin}:\n{ptx.stdout}"
    for arch in info.cuda_archs:
        assert f".sm_{arch}.cubin" in elf.stdout, f"no sm_{arch} machine code in {spec.origin}:\n{elf.stdout}"
    # Only the plain architectures carry PTX (90a's would run nowhere else).
    listed = set(re.findall(r"\.sm_([0-9]+[a-z]?)\.ptx", ptx.stdout))
    assert listed == set(plain), listed
