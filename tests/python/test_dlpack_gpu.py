"""GPU: the framework-neutral API flash_mla.ops with CuPy and JAX arrays (DLPack).

Problems are built with torch (conftest.make_case: poisoned unused memory, strided layouts),
handed to the other framework, decoded through flash_mla.ops with that framework's buffers and
streams, and compared with flash_mla.reference (float64) on the torch side.

* CuPy: every array a CuPy array (inputs as zero-copy views of the torch tensors, strides
  included; outputs, metadata and workspace allocated by CuPy), float16 (CuPy has no
  bfloat16), on a CuPy stream given as a Stream object, an int handle, the CUDA stream
  protocol (__cuda_stream__) or None (the legacy default stream).
* JAX: inputs are JAX-allocated arrays (copies, JAX arrays are dense row-major), outputs are
  torch or CuPy buffers (JAX arrays are immutable: passing one as an output is a TypeError),
  the result imported into JAX with jax.dlpack.from_dlpack (zero-copy).

* Page sizes: ops.mla_decode with caches of 16 to 256 tokens per page (torch tensors through
  DLPack, so it needs neither CuPy nor JAX).

Skipped without a CUDA GPU, and per framework when CuPy / JAX (with a GPU backend) is missing.
"""

from __future__ import annotations

import math
import os
import random
import re

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("flash-mla GPU tests need a CUDA GPU", allow_module_level=True)

# JAX must not grab 75 % of the GPU memory the other tests need (read when its backend starts).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

from flash_mla import get_mla_metadata, ops  # noqa: E402
from flash_mla.reference import mla_decode_reference  # noqa: E402

from conftest import PAGE_SIZES, page_lengths  # noqa: E402  (tests/python is on sys.path)

pytestmark = pytest.mark.requires_gpu

DV = 512


def reference(case, causal):
    return mla_decode_reference(case.q, case.k_cache, case.block_table, case.cache_seqlens, DV, None, causal,
                                accum_dtype=torch.float64)


def _cupy():
    cp = pytest.importorskip("cupy")
    try:
        cp.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001 - a CuPy without a usable CUDA runtime
        pytest.skip(f"CuPy cannot use the GPU: {exc}")
    return cp


def _jax():
    jax = pytest.importorskip("jax")
    try:
        gpus = jax.devices("gpu")
    except RuntimeError as exc:
        pytest.skip(f"JAX has no GPU backend: {exc}")
    if not gpus:
        pytest.skip("JAX sees no GPU")
    return jax, gpus[0]


def _sizes(case):
    parts = ops.num_sm_parts(case.s_q, case.h_q, case.h_kv)
    return ops.workspace_shapes(case.b, case.s_q, case.h_q, case.h_kv, parts)


def _cupy_buffers(cp, shapes):
    """CuPy metadata, fp16 outputs (NaN-poisoned) and workspace for ops.mla_decode, synchronized:
    (meta, splits, out, lse, o_accum, lse_accum)."""
    bufs = (cp.empty(shapes["tile_scheduler_metadata"], dtype=cp.int32),
            cp.empty(shapes["num_splits"], dtype=cp.int32),
            cp.full(shapes["out"], cp.nan, dtype=cp.float16),
            cp.full(shapes["lse"], cp.nan, dtype=cp.float32),
            cp.empty(shapes["o_accum"], dtype=cp.float32),
            cp.empty(shapes["lse_accum"], dtype=cp.float32))
    cp.cuda.Device().synchronize()
    return bufs


# ----------------------------------------------------------------------------------------------
# CuPy
# ----------------------------------------------------------------------------------------------


class _ProtocolStream:
    """A stream seen only through the CUDA stream protocol."""

    def __init__(self, handle: int):
        self.handle = handle

    def __cuda_stream__(self):
        return (0, self.handle)


CUPY_SHAPES = [
    # b, s_q, h_q, h_kv, lengths, q_layout, k_layout
    (4, 1, 128, 1, [100, 4097, 0, 777], "contiguous", "contiguous"),
    (13, 2, 16, 1, "edge", "bhsd", "row_pad"),
    (5, 4, 20, 2, "mixed", "head_pad", "head_pad"),
    (3, 1, 16, 1, "long", "hsbd", "contiguous"),
]


@pytest.mark.parametrize("stream_kind", ["object", "int", "protocol", "none"])
@pytest.mark.parametrize("shape", CUPY_SHAPES, ids=[f"b{s[0]}_sq{s[1]}_h{s[2]}_kv{s[3]}" for s in CUPY_SHAPES])
def test_cupy_arrays(shape, stream_kind, make_case, check_decode, seed):
    cp = _cupy()
    b, s_q, h_q, h_kv, lengths, q_layout, k_layout = shape
    causal = s_q > 1
    case = make_case(b, s_q, h_q, h_kv, lengths, torch.float16, seed=seed, q_layout=q_layout, k_layout=k_layout)
    ref_out, ref_lse = reference(case, causal)
    torch.cuda.synchronize()  # the inputs are ready before any other stream reads them

    # Zero-copy CuPy views of the torch inputs (strides and storage offsets preserved).
    q, k, bt, sl = (cp.from_dlpack(t) for t in (case.q, case.k_cache, case.block_table, case.cache_seqlens))
    meta, splits, out, lse, o_accum, lse_accum = _cupy_buffers(cp, _sizes(case))

    cupy_stream = cp.cuda.Stream(non_blocking=True)
    stream = {"object": cupy_stream, "int": cupy_stream.ptr, "protocol": _ProtocolStream(cupy_stream.ptr),
              "none": None}[stream_kind]
    ops.get_mla_metadata(sl, meta, splits, stream=stream)
    r_out, r_lse = ops.mla_decode(q, k, bt, sl, meta, splits, out, lse, o_accum, lse_accum, causal=causal,
                                  stream=stream)
    assert r_out is out and r_lse is lse
    cp.cuda.Device().synchronize()

    # Same plan as the torch API's.
    t_meta, t_splits = get_mla_metadata(case.cache_seqlens, case.rows_per_kv_head, case.h_kv)
    assert torch.equal(torch.from_dlpack(meta), t_meta) and torch.equal(torch.from_dlpack(splits), t_splits)
    check_decode(torch.from_dlpack(out), torch.from_dlpack(lse), ref_out, ref_lse, torch.float16,
                 what=f"cupy stream={stream_kind} {case.describe()}")


def test_cupy_outputs_with_torch_inputs(make_case, check_decode, seed):
    """Frameworks mix: torch inputs, CuPy outputs and workspace, a torch stream."""
    cp = _cupy()
    case = make_case(6, 2, 32, 1, "mixed", torch.float16, seed=seed, q_layout="head_pad")
    ref_out, ref_lse = reference(case, True)
    meta, splits = get_mla_metadata(case.cache_seqlens, case.rows_per_kv_head, case.h_kv)
    shapes = _sizes(case)
    out = cp.empty(shapes["out"], dtype=cp.float16)
    lse = cp.empty(shapes["lse"], dtype=cp.float32)
    o_accum = cp.empty(shapes["o_accum"], dtype=cp.float32)
    lse_accum = cp.empty(shapes["lse_accum"], dtype=cp.float32)
    cp.cuda.Device().synchronize()
    ops.mla_decode(case.q, case.k_cache, case.block_table, case.cache_seqlens, meta, splits, out, lse, o_accum,
                   lse_accum, causal=True, stream=torch.cuda.current_stream())
    torch.cuda.synchronize()
    check_decode(torch.from_dlpack(out), torch.from_dlpack(lse), ref_out, ref_lse, torch.float16, what="mixed")


def test_cupy_argument_errors(make_case, seed):
    cp = _cupy()
    case = make_case(2, 1, 16, 1, [70, 5], torch.float16, seed=seed)
    torch.cuda.synchronize()
    q, k, bt, sl = (cp.from_dlpack(t) for t in (case.q, case.k_cache, case.block_table, case.cache_seqlens))
    shapes = _sizes(case)
    meta = cp.zeros(shapes["tile_scheduler_metadata"], dtype=cp.int32)
    splits = cp.zeros(shapes["num_splits"], dtype=cp.int32)
    ops.get_mla_metadata(sl, meta, splits)
    out = cp.empty(shapes["out"], dtype=cp.float16)
    lse = cp.empty(shapes["lse"], dtype=cp.float32)
    o_accum = cp.empty(shapes["o_accum"], dtype=cp.float32)
    lse_accum = cp.empty(shapes["lse_accum"], dtype=cp.float32)
    good = [q, k, bt, sl, meta, splits, out, lse, o_accum, lse_accum]
    bad = [
        (0, q.astype(cp.float32), TypeError, "q"),
        (0, q[:, :, :, ::2], ValueError, "q"),
        (1, k[:, :48], ValueError, "page_block_size"),  # 48-token pages: not a supported size
        (2, bt.astype(cp.int64), TypeError, "block_table"),
        (3, cp.asnumpy(sl), ValueError, "cache_seqlens"),  # host memory
        (6, out.astype(cp.float32), TypeError, "out"),
        (6, out[:, :, ::-1], (ValueError, TypeError), "out"),  # negative strides (exported or refused)
        (7, lse.reshape(lse.shape[0], -1), ValueError, "lse"),
        (8, o_accum[:1], ValueError, "o_accum"),
        (9, lse_accum[:, :3], ValueError, "lse_accum"),
    ]
    for index, value, exc, name in bad:
        args = list(good)
        args[index] = value
        with pytest.raises(exc, match=name):
            ops.mla_decode(*args)
    # Negative strides on q: refused, or (CuPy may export a copy) decoded like the copy would be.
    try:
        ops.mla_decode(q[:, :, ::-1], *good[1:])
    except (TypeError, ValueError, RuntimeError) as exc:
        assert re.search("q|strides", str(exc)), exc
    else:
        got = out.copy()
        ops.mla_decode(cp.ascontiguousarray(q[:, :, ::-1]), *good[1:])
        assert bool(cp.array_equal(got, out)), "negative-stride q decoded differently from its copy"
    cp.cuda.Device().synchronize()


def test_cupy_check_paged_inputs(make_case, seed):
    cp = _cupy()
    case = make_case(4, 1, 16, 1, [200, 64, 129, 5], torch.float16, seed=seed, table_width=5)
    torch.cuda.synchronize()
    bt = cp.from_dlpack(case.block_table).copy()
    sl = cp.from_dlpack(case.cache_seqlens).copy()
    result = cp.zeros((ops.INPUT_CHECK_WORDS,), dtype=cp.int64)
    ops.check_paged_inputs(bt, sl, case.num_blocks, result)
    assert ops.input_check_error(cp.asnumpy(result).tolist()) is None
    bt[1, 0] = -3
    ops.check_paged_inputs(bt, sl, case.num_blocks, result)
    message = ops.input_check_error(cp.asnumpy(result).tolist(), case.num_blocks, 5)
    assert message is not None and "block_table[1, 0] = -3" in message


# ----------------------------------------------------------------------------------------------
# page sizes (torch tensors through DLPack)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("page", PAGE_SIZES, ids=[f"page{p}" for p in PAGE_SIZES])
def test_ops_decode_page_sizes(page, make_case, check_decode, seed):
    """ops.get_mla_metadata + ops.mla_decode on caches of every page size, outputs NaN-filled
    beforehand, the workspace sized by ops.workspace_shapes."""
    case = make_case(7, 2, 16, 1, page_lengths(page, 7, random.Random(seed)), torch.bfloat16, seed=seed,
                     page=page, k_layout="page_pad")
    shapes = _sizes(case)
    meta = torch.empty(shapes["tile_scheduler_metadata"], dtype=torch.int32, device="cuda")
    splits = torch.empty(shapes["num_splits"], dtype=torch.int32, device="cuda")
    out = torch.full(shapes["out"], math.nan, dtype=torch.bfloat16, device="cuda")
    lse = torch.full(shapes["lse"], math.nan, device="cuda")
    o_accum = torch.full(shapes["o_accum"], math.nan, device="cuda")
    lse_accum = torch.full(shapes["lse_accum"], math.nan, device="cuda")
    stream = torch.cuda.current_stream()
    ops.get_mla_metadata(case.cache_seqlens, meta, splits, stream=stream)
    ops.mla_decode(case.q, case.k_cache, case.block_table, case.cache_seqlens, meta, splits, out, lse, o_accum,
                   lse_accum, causal=True, stream=stream)
    torch.cuda.synchronize()
    check_decode(out, lse, *reference(case, True), torch.bfloat16, what=f"ops page {page} {case.describe()}")


# ----------------------------------------------------------------------------------------------
# JAX
# ----------------------------------------------------------------------------------------------


def _to_jax(jax, device, t: torch.Tensor):
    """A JAX-allocated copy of a torch tensor (16-bit floats travel as float32: exact)."""
    import jax.numpy as jnp

    host = t.detach().cpu()
    if t.dtype in (torch.bfloat16, torch.float16):
        arr = jax.device_put(host.float().contiguous().numpy(), device)
        arr = arr.astype(jnp.bfloat16 if t.dtype == torch.bfloat16 else jnp.float16)
    else:
        arr = jax.device_put(host.contiguous().numpy(), device)
    return arr.block_until_ready()


@pytest.mark.parametrize("out_framework", ["torch", "cupy"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_jax_inputs(dtype, out_framework, make_case, check_decode, seed):
    jax, device = _jax()
    if out_framework == "cupy":
        cp = _cupy()
        if dtype == torch.bfloat16:
            pytest.skip("CuPy has no bfloat16 output buffers")
    case = make_case(7, 2, 32, 1, "edge", dtype, seed=seed)
    ref_out, ref_lse = reference(case, True)
    q, k, bt, sl = (_to_jax(jax, device, t) for t in (case.q, case.k_cache, case.block_table, case.cache_seqlens))
    shapes = _sizes(case)
    if out_framework == "torch":
        def alloc(name, dt):
            return torch.full(shapes[name], math.nan if dt.is_floating_point else 0, dtype=dt, device="cuda")
        meta, splits = alloc("tile_scheduler_metadata", torch.int32), alloc("num_splits", torch.int32)
        out, lse = alloc("out", dtype), alloc("lse", torch.float32)
        o_accum, lse_accum = alloc("o_accum", torch.float32), alloc("lse_accum", torch.float32)
        stream = torch.cuda.current_stream()
        torch.cuda.synchronize()
    else:
        meta, splits, out, lse, o_accum, lse_accum = _cupy_buffers(cp, shapes)
        stream = cp.cuda.get_current_stream()
    ops.get_mla_metadata(sl, meta, splits, stream=stream)
    ops.mla_decode(q, k, bt, sl, meta, splits, out, lse, o_accum, lse_accum, causal=True, stream=stream)
    torch.cuda.synchronize()
    t_out, t_lse = torch.from_dlpack(out), torch.from_dlpack(lse)
    check_decode(t_out, t_lse, ref_out, ref_lse, dtype, what=f"jax inputs, {out_framework} outputs")

    # The result into JAX, zero-copy; same bits.
    import jax.numpy as jnp

    j_out = jax.dlpack.from_dlpack(out)
    j_lse = jax.dlpack.from_dlpack(lse)
    assert j_out.shape == tuple(shapes["out"]) and j_lse.dtype == jnp.float32
    host_bits = np.asarray(j_out).view(np.uint16)
    assert np.array_equal(host_bits, t_out.view(torch.int16).cpu().numpy().view(np.uint16))
    assert np.array_equal(np.asarray(j_lse), t_lse.cpu().numpy(), equal_nan=True)


def test_jax_arrays_rejected_as_outputs(make_case, seed):
    jax, device = _jax()
    import jax.numpy as jnp

    case = make_case(2, 1, 16, 1, [70, 5], torch.bfloat16, seed=seed)
    q, k, bt, sl = (_to_jax(jax, device, t) for t in (case.q, case.k_cache, case.block_table, case.cache_seqlens))
    shapes = _sizes(case)
    meta = torch.empty(shapes["tile_scheduler_metadata"], dtype=torch.int32, device="cuda")
    splits = torch.empty(shapes["num_splits"], dtype=torch.int32, device="cuda")
    ops.get_mla_metadata(sl, meta, splits, stream=torch.cuda.current_stream())
    outputs = dict(out=torch.empty(shapes["out"], dtype=torch.bfloat16, device="cuda"),
                   lse=torch.empty(shapes["lse"], device="cuda"),
                   o_accum=torch.empty(shapes["o_accum"], device="cuda"),
                   lse_accum=torch.empty(shapes["lse_accum"], device="cuda"))
    jax_versions = dict(out=jnp.zeros(shapes["out"], jnp.bfloat16), lse=jnp.zeros(shapes["lse"], jnp.float32),
                        o_accum=jnp.zeros(shapes["o_accum"], jnp.float32),
                        lse_accum=jnp.zeros(shapes["lse_accum"], jnp.float32))
    for name, jax_array in jax_versions.items():
        args = dict(outputs, **{name: jax_array})
        with pytest.raises(TypeError, match=f"{name}: JAX arrays are immutable"):
            ops.mla_decode(q, k, bt, sl, meta, splits, args["out"], args["lse"], args["o_accum"],
                           args["lse_accum"])
    with pytest.raises(TypeError, match="JAX arrays are immutable"):
        ops.get_mla_metadata(sl, jnp.zeros(shapes["tile_scheduler_metadata"], jnp.int32), splits)
    torch.cuda.synchronize()
