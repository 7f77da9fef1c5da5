"""flash-mla: Multi-head Latent Attention decoding kernels for NVIDIA GPUs.

The two entry points keep FlashMLA's API:

    meta, splits = get_mla_metadata(cache_seqlens, s_q * h_q // h_kv, h_kv)
    out, lse = flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, 512,
                                      meta, splits, softmax_scale=None, causal=False)

``flash_mla.reference`` holds a plain-torch implementation of the same contract.
"""

from .interface import (
    FlashMLASchedMeta,
    flash_mla_with_kvcache,
    get_mla_metadata,
    host_plan,
    kernel_for_device,
)

__all__ = [
    "FlashMLASchedMeta",
    "flash_mla_with_kvcache",
    "get_mla_metadata",
    "host_plan",
    "kernel_for_device",
]

__version__ = "0.1.0"
