"""Reproduces the segfault at interpreter exit seen after the hostile ops_decode examples on the
GPU, with NO flash_mla code loaded: stub modules stand in for the package (every call raises
ValueError). On an H200 with torch 2.11 it crashes at exit in 5 runs of 5, so the crash is not
flash-mla's; tests/python/hostile.py therefore ends with os._exit.

    python3 tests/repro_hostile_exit_crash.py 10      # rc 139 on the GPU machines
"""
import sys, os, types
import torch
def fake(*a, **k):
    raise ValueError("fake: not called")
def fake_meta(sl, rows=None, hkv=None, *a, **k):
    if sl is None:
        return object(), None
    return (torch.zeros((132, 8), dtype=torch.int32, device=sl.device),
            torch.zeros((sl.shape[0] + 1,), dtype=torch.int32, device=sl.device))
pkg = types.ModuleType("flash_mla"); pkg.__path__ = []
ops = types.ModuleType("flash_mla.ops")
for name in ("mla_decode", "check_paged_inputs", "workspace_shapes", "num_sm_parts", "device_sm_count",
             "stream_handle", "input_check_error"):
    setattr(ops, name, fake)
ops.get_mla_metadata = fake
def workspace_shapes(batch, s_q, h_q, h_kv, num_sm_parts):
    splits = batch + num_sm_parts; rows = s_q * h_q
    return {"tile_scheduler_metadata": (num_sm_parts, 8), "num_splits": (batch + 1,), "out": (batch, s_q, h_q, 512),
            "lse": (batch, h_q, s_q), "o_accum": (splits, rows, 512), "lse_accum": (splits, rows)}
ops.workspace_shapes = workspace_shapes
ops.DTYPES = {}
pkg.ops = ops
pkg.get_mla_metadata = fake_meta
pkg.flash_mla_with_kvcache = fake
pkg.FlashMLASchedMeta = object
sys.modules["flash_mla"] = pkg
sys.modules["flash_mla.ops"] = ops
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "python"))
import hostile
assert "flash_mla._C" not in sys.modules and "flash_mla.interface" not in sys.modules
hostile.make_test("ops_decode", "cuda", int(sys.argv[1]))()
print("ran; flash_mla modules loaded:", [m for m in sys.modules if m.startswith("flash_mla")], flush=True)
