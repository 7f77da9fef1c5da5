"""flash-mla: Multi-head Latent Attention decoding kernels for NVIDIA GPUs.

The two entry points keep FlashMLA's API:

    meta, splits = get_mla_metadata(cache_seqlens, s_q * h_q // h_kv, h_kv)
    out, lse = flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, 512,
                                      meta, splits, softmax_scale=None, causal=False)

``flash_mla.reference`` holds a plain-torch implementation of the same contract, and
``flash_mla.ops`` a framework-neutral API (any DLPack arrays, caller-provided outputs) that
does not need torch. The full contract is in ``docs/api.md``; ``python -m flash_mla`` prints
the version, how the build was made and the kernel each GPU gets (``--demo`` runs one decode).

torch is imported lazily: ``import flash_mla.ops`` works without it. The torch API (and the
``torch.ops.flash_mla`` custom ops it registers) loads on first use of one of the names below,
or right away when torch was imported before flash_mla.
"""

import importlib
import sys

_TORCH_API = (
    "FlashMLASchedMeta",
    "flash_mla_with_kvcache",
    "get_mla_metadata",
    "host_plan",
    "kernel_for_device",
)

__all__ = list(_TORCH_API)


def __getattr__(name):
    if name in _TORCH_API:
        interface = importlib.import_module(".interface", __name__)
        for api_name in _TORCH_API:
            globals()[api_name] = getattr(interface, api_name)
        return globals()[name]
    if name in ("ops", "reference", "interface", "kv_formats", "sparse_reference"):
        return importlib.import_module("." + name, __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_TORCH_API) | {"ops", "reference", "interface", "kv_formats", "sparse_reference"})


def _find_version() -> str:
    """The version declared in pyproject.toml, as the build recorded it next to the compiled module
    (``_build_info.py``), else from the installed distribution's metadata."""
    try:
        from ._build_info import version as built
        return built
    except ImportError:
        pass
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover
        return "0+unknown"
    try:
        return version("flash-mla")
    except PackageNotFoundError:
        return "0+unknown"


__version__ = _find_version()


if "torch" in sys.modules:  # torch users: register the custom ops now
    __getattr__("flash_mla_with_kvcache")
