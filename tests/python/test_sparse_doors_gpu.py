"""Token-sparse decode through its other doors, on the GPU: the DLPack ``flash_mla.ops`` API and
torch.compile(fullgraph=True) (the ``flash_mla::sparse_decode`` custom op, planning included).
Both must give, bit for bit, what the eager torch call gives on the same inputs (same kernel),
and that must match the float reference (test_sparse_gpu.py covers the kernel itself).
"""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("flash-mla GPU tests need a CUDA GPU", allow_module_level=True)

import flash_mla  # noqa: E402
from flash_mla import flash_mla_with_kvcache, get_mla_metadata, kv_formats, ops  # noqa: E402
from flash_mla.sparse_reference import sparse_decode_reference  # noqa: E402

from conftest import assert_bitwise_equal, assert_decode_matches  # noqa: E402

pytestmark = pytest.mark.requires_gpu

DV = 512


def _inputs(seed, fmt="v32", b=3, s_q=2, h_q=16, topk=96, page=61, extra=(40, 16)):
    """q, caches (as the kernel takes them: uint8 for FP8), indices with junk entries, lengths, a
    sink, and the dequantized caches for the reference."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    d = 512 if fmt == "model1" else 576

    def cache(num_blocks, pg):
        values = (torch.randn((num_blocks, pg, 1, d), generator=gen, device="cuda") * 0.5).to(torch.bfloat16)
        if fmt == "v32":
            c = kv_formats.quantize_kv_cache_v32(values)
        elif fmt == "model1":
            c = kv_formats.quantize_kv_cache_model1(values)
        else:
            c = values
        return c, kv_formats.dequantize_sparse_kv_cache(c)

    def indices(k, cap):
        idx = torch.randint(0, cap, (b, s_q, k), generator=gen, device="cuda", dtype=torch.int32)
        idx[0, 0, :3] = torch.tensor([-1, cap, -77], dtype=torch.int32)
        return idx

    nb = b * s_q * topk // page + 1
    k, k_deq = cache(nb, page)
    e_topk, e_page = extra
    e_nb = b * s_q * e_topk // e_page + 1
    ek, ek_deq = cache(e_nb, e_page)
    return dict(
        q=torch.randn((b, s_q, h_q, d), generator=gen, device="cuda").to(torch.bfloat16),
        k=k, k_deq=k_deq, idx=indices(topk, nb * page),
        ek=ek, ek_deq=ek_deq, eidx=indices(e_topk, e_nb * e_page),
        tl=torch.tensor([topk, topk // 2, 0][:b], dtype=torch.int32, device="cuda"),
        etl=torch.tensor([e_topk, 5, e_topk][:b], dtype=torch.int32, device="cuda"),
        sink=torch.randn((h_q,), generator=gen, device="cuda"),
        is_fp8=fmt != "bf16",
    )


def _eager(x, kernel="auto", sched=None):
    return flash_mla_with_kvcache(x["q"], x["k"], None, None, DV, sched, None, None, False, x["is_fp8"], x["idx"],
                                  x["sink"], x["ek"], x["eidx"], x["tl"], x["etl"], kernel=kernel)


def _check_reference(out, lse, x, what):
    ref_out, ref_lse = sparse_decode_reference(x["q"], x["k_deq"], x["idx"], topk_length=x["tl"],
                                               attn_sink=x["sink"], extra_kv=x["ek_deq"], extra_indices=x["eidx"],
                                               extra_topk_length=x["etl"])
    assert_decode_matches(out, lse, ref_out, ref_lse, torch.bfloat16, what=what)


@pytest.mark.parametrize("fmt", ["v32", "model1", "bf16"])
@pytest.mark.parametrize("kernel", ["sm80_large", "sm80_small", "sm90"])
def test_ops_sparse_decode_matches_torch_api(fmt, kernel, seed):
    """ops.sparse_decode over DLPack (torch tensors here), with the caller's plan and workspace."""
    if kernel == "sm90" and fmt == "model1":
        pytest.skip("the sm90 token-sparse kernel takes the V3.2 format and 576-channel bf16 caches only")
    try:
        flash_mla.kernel_for_device(kernel=kernel)
    except (RuntimeError, ValueError) as err:
        pytest.skip(f"kernel {kernel!r} does not run here: {err}")
    x = _inputs(seed, fmt)
    out_t, lse_t = _eager(x, kernel)
    _check_reference(out_t, lse_t, x, f"torch API {fmt} {kernel}")
    b, s_q, h_q, _ = x["q"].shape
    parts = ops.num_sm_parts(1, h_q, 1)
    shapes = ops.sparse_workspace_shapes(b, s_q, h_q, parts)
    keys = x["idx"].shape[2] + x["eidx"].shape[2]
    plan = torch.full(shapes["plan_seqlens"], keys, dtype=torch.int32, device="cuda")
    meta = torch.empty(shapes["tile_scheduler_metadata"], dtype=torch.int32, device="cuda")
    splits = torch.empty(shapes["num_splits"], dtype=torch.int32, device="cuda")
    stream = torch.cuda.current_stream()
    ops.get_mla_metadata(plan, meta, splits, stream=stream)
    out = torch.full(shapes["out"], float("nan"), dtype=torch.bfloat16, device="cuda")
    lse = torch.full(shapes["lse"], float("nan"), dtype=torch.float32, device="cuda")
    o_accum = torch.empty(shapes["o_accum"], dtype=torch.float32, device="cuda")
    lse_accum = torch.empty(shapes["lse_accum"], dtype=torch.float32, device="cuda")
    ops.sparse_decode(x["q"], x["k"], x["idx"], plan, meta, splits, out, lse, o_accum, lse_accum,
                      is_fp8_kvcache=x["is_fp8"], topk_length=x["tl"], extra_k_cache=x["ek"],
                      extra_indices_in_kvcache=x["eidx"], extra_topk_length=x["etl"], attn_sink=x["sink"],
                      stream=stream, kernel=kernel)
    torch.cuda.synchronize()
    assert_bitwise_equal(out, out_t, f"ops out vs torch API ({fmt} {kernel})")
    assert_bitwise_equal(lse, lse_t.transpose(1, 2), f"ops lse vs torch API ({fmt} {kernel})")


def test_ops_sparse_decode_refuses_sm90_and_bad_lse(seed):
    """kernel="sm90" with a format other than V3.2 (here the 512-dim one) and an lse of the
    torch API's layout are refused."""
    x = _inputs(seed, fmt="model1")
    b, s_q, h_q, _ = x["q"].shape
    shapes = ops.sparse_workspace_shapes(b, s_q, h_q, 4)
    plan = torch.full(shapes["plan_seqlens"], 136, dtype=torch.int32, device="cuda")
    meta = torch.empty(shapes["tile_scheduler_metadata"], dtype=torch.int32, device="cuda")
    splits = torch.empty(shapes["num_splits"], dtype=torch.int32, device="cuda")
    out = torch.empty(shapes["out"], dtype=torch.bfloat16, device="cuda")
    o_accum = torch.empty(shapes["o_accum"], dtype=torch.float32, device="cuda")
    lse_accum = torch.empty(shapes["lse_accum"], dtype=torch.float32, device="cuda")
    args = (x["q"], x["k"], x["idx"], plan, meta, splits, out)
    with pytest.raises(ValueError, match="sm90"):
        ops.sparse_decode(*args, torch.empty(shapes["lse"], device="cuda"), o_accum, lse_accum,
                          is_fp8_kvcache=True, kernel="sm90")
    with pytest.raises(ValueError, match="lse"):  # (batch, h_q, s_q) is the torch API's view, not ops'
        ops.sparse_decode(*args, torch.empty((b, h_q, s_q), device="cuda"), o_accum, lse_accum,
                          is_fp8_kvcache=True)


def _sparse_step(q, ks, idx, sink, eks, eidx, tl, etl):
    """A model step: every layer's token-sparse call, planned inside the graph."""
    outs = []
    for k, ek in zip(ks, eks):
        outs.append(flash_mla_with_kvcache(q, k, None, None, DV, None, None, None, False, True, idx, sink, ek, eidx,
                                           tl, etl))
    return outs


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph_sparse_matches_eager(backend, seed):
    x = _inputs(seed)
    y = _inputs(seed + 1)
    torch._dynamo.reset()
    compiled = torch.compile(_sparse_step, backend=backend, fullgraph=True)
    args = (x["q"], [x["k"], y["k"]], x["idx"], x["sink"], [x["ek"], y["ek"]], x["eidx"], x["tl"], x["etl"])
    got = compiled(*args)
    want = _sparse_step(*args)
    for i, ((o, lse), (eo, el)) in enumerate(zip(got, want)):
        assert lse.shape == el.shape
        assert_bitwise_equal(o, eo, f"{backend} out vs eager, layer {i}")
        assert_bitwise_equal(lse, el, f"{backend} lse vs eager, layer {i}")
    _check_reference(*got[0], x, f"{backend} layer 0")
    torch._dynamo.reset()


def test_sched_object_eager_then_graph_replay(seed):
    """One scheduler object planned by the first call, then the same call in a CUDA graph, replayed
    with new indices written in place."""
    x = _inputs(seed)
    sched, _ = get_mla_metadata()
    out0, lse0 = _eager(x, sched=sched)
    _check_reference(out0, lse0, x, "planned by the first call")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        _eager(x, sched=sched)
        with torch.cuda.graph(graph, stream=stream):
            out, lse = _eager(x, sched=sched)
    torch.cuda.current_stream().wait_stream(stream)
    fresh = _inputs(seed + 7)
    x["idx"].copy_(fresh["idx"])
    graph.replay()
    torch.cuda.synchronize()
    _check_reference(out, lse, x, "graph replay with new indices")
    assert flash_mla.kernel_for_device(kernel="auto") in ("sm90", "sm80_large", "sm80_small")
