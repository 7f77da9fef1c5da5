"""GPU: framework integration of the torch API and the behaviour around it.

* torch.library custom ops: torch.library.opcheck, torch.compile(fullgraph=True) with the
  eager / aot_eager / inductor backends (static and dynamic shapes), out= / lse= under compile,
  caches of 16- and 256-token pages under compile;
* out= / lse= preallocated outputs (results, neighbours untouched, checks on the GPU);
* CUDA graphs: several layers captured with one metadata, replayed with new contents;
* check_inputs=True: bad pages and lengths found on the GPU, valid junk tails accepted, eager
  only (refused during graph capture), and the framework-neutral ops.check_paged_inputs; with
  16- and 256-token pages, the limits follow k_cache's page size (its page_size keyword for
  ops.check_paged_inputs);
* determinism: repeated calls give bitwise identical out and lse, for every kernel;
* two streams running different batches concurrently both give correct results.

Skipped without a CUDA GPU.
"""

from __future__ import annotations

import functools
import importlib.util
import math

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("flash-mla GPU tests need a CUDA GPU", allow_module_level=True)

import flash_mla  # noqa: E402
from flash_mla import flash_mla_with_kvcache, get_mla_metadata, ops  # noqa: E402
from flash_mla.reference import mla_decode_reference  # noqa: E402

from conftest import (  # noqa: E402  (tests/python is on sys.path)
    assert_bitwise_equal,
    capture_graph,
    page_edge_lengths,
)

pytestmark = pytest.mark.requires_gpu

DV = 512
KERNELS = ("auto", "sm80_large", "sm80_small", "sm90")


@functools.lru_cache(maxsize=None)
def kernel_runs(kernel: str) -> bool:
    try:
        flash_mla.kernel_for_device(kernel=kernel)
    except (RuntimeError, ValueError):
        return False
    return True


def runnable_kernels():
    return [k for k in KERNELS if kernel_runs(k)]


def metadata(case):
    return get_mla_metadata(case.cache_seqlens, case.rows_per_kv_head, case.h_kv)


def reference(case, causal=True, softmax_scale=None):
    return mla_decode_reference(case.q, case.k_cache, case.block_table, case.cache_seqlens, DV, softmax_scale,
                                causal, accum_dtype=torch.float64)


def decode(case, meta, splits, causal=True, **kwargs):
    return flash_mla_with_kvcache(case.q, case.k_cache, case.block_table, case.cache_seqlens, DV, meta, splits,
                                  causal=causal, **kwargs)


# ----------------------------------------------------------------------------------------------
# custom ops: opcheck
# ----------------------------------------------------------------------------------------------


def test_opcheck_custom_ops(make_case, seed):
    case = make_case(3, 2, 16, 1, [70, 0, 700], torch.bfloat16, seed=seed)
    meta, splits = metadata(case)
    scale = 1.0 / math.sqrt(576)
    torch.library.opcheck(torch.ops.flash_mla.get_mla_metadata.default,
                          (case.cache_seqlens, case.rows_per_kv_head, case.h_kv))
    args = (case.q, case.k_cache, case.block_table, case.cache_seqlens, DV, meta, splits, scale, True, 0)
    torch.library.opcheck(torch.ops.flash_mla.mla_decode.default, args)
    out = torch.empty((case.b, case.s_q, case.h_q, DV), dtype=case.dtype, device="cuda")
    lse = torch.empty((case.b, case.h_q, case.s_q), dtype=torch.float32, device="cuda")
    args = (case.q, case.k_cache, case.block_table, case.cache_seqlens, DV, meta, splits, out, lse, scale, True, 0)
    torch.library.opcheck(torch.ops.flash_mla.mla_decode_out.default, args)


# ----------------------------------------------------------------------------------------------
# torch.compile
# ----------------------------------------------------------------------------------------------


def _layers(make_case, seed, b=6, s_q=2, h_q=32, h_kv=1, n=3, dtype=torch.bfloat16, lengths="mixed",
            page=64):
    """n layers of one decoding step: same lengths / block table, fresh q and cache each."""
    first = make_case(b, s_q, h_q, h_kv, lengths, dtype, seed=seed, q_layout="head_pad", page=page)
    return [first] + [first.with_new_data(seed + i) for i in range(1, n)]


def _model_step(qs, ks, block_table, cache_seqlens):
    """What a model's decoding step does: one metadata, reused by every layer."""
    meta, splits = get_mla_metadata(cache_seqlens, qs[0].shape[1] * qs[0].shape[2] // ks[0].shape[2],
                                    ks[0].shape[2])
    outs = []
    for q, k in zip(qs, ks):
        outs.append(flash_mla_with_kvcache(q, k, block_table, cache_seqlens, DV, meta, splits, causal=True))
    return outs


def _backend_params():
    params = [pytest.param("eager", False, id="eager"), pytest.param("aot_eager", False, id="aot_eager"),
              pytest.param("aot_eager", True, id="aot_eager-dynamic")]
    if importlib.util.find_spec("triton") is not None:
        params.append(pytest.param("inductor", False, id="inductor"))
    else:
        params.append(pytest.param("inductor", False, id="inductor",
                                   marks=pytest.mark.skip(reason="inductor needs triton")))
    return params


@pytest.mark.parametrize("backend, dynamic", _backend_params())
def test_compile_fullgraph_matches_eager(backend, dynamic, make_case, check_decode, seed):
    torch._dynamo.reset()
    compiled = torch.compile(_model_step, backend=backend, fullgraph=True, dynamic=dynamic)
    # Two decoding steps of different batch sizes (a recompile, or one dynamic graph).
    for step, b in enumerate((6, 9)):
        layers = _layers(make_case, seed + 100 * step, b=b)
        _check_compiled_step(compiled, layers, check_decode, f"{backend} step {step}")
    torch._dynamo.reset()


def _check_compiled_step(compiled, layers, check_decode, label):
    """The compiled model step on `layers` matches the reference and, bit for bit, eager."""
    qs, ks = [c.q for c in layers], [c.k_cache for c in layers]
    eager = _model_step(qs, ks, layers[0].block_table, layers[0].cache_seqlens)
    got = compiled(qs, ks, layers[0].block_table, layers[0].cache_seqlens)
    for i, ((o, l), (eo, el), case) in enumerate(zip(got, eager, layers)):
        check_decode(o, l, *reference(case), case.dtype, what=f"{label} layer {i}")
        assert_bitwise_equal(o, eo, f"{label} out vs eager, layer {i}")
        assert_bitwise_equal(l, el, f"{label} lse vs eager, layer {i}")


@pytest.mark.parametrize("page", [16, 256], ids=["page16", "page256"])
def test_compile_fullgraph_page_sizes(page, make_case, check_decode, seed):
    """Caches of 16- and 256-token pages through torch.compile(fullgraph=True) (aot_eager): the
    custom ops' fake implementations take them, and the compiled step matches eager."""
    torch._dynamo.reset()
    compiled = torch.compile(_model_step, backend="aot_eager", fullgraph=True)
    layers = _layers(make_case, seed, b=7, n=2, page=page)
    assert layers[0].page == page
    _check_compiled_step(compiled, layers, check_decode, f"page {page}")
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["eager", "aot_eager"] +
                         (["inductor"] if importlib.util.find_spec("triton") is not None else []))
def test_compile_fullgraph_with_out_buffers(backend, make_case, check_decode, seed):
    """out= / lse= (a mutating custom op) under torch.compile: the buffers are written."""
    torch._dynamo.reset()
    layers = _layers(make_case, seed, n=2)

    def step(qs, ks, bt, sl, outs, lses):
        meta, splits = get_mla_metadata(sl, qs[0].shape[1] * qs[0].shape[2] // ks[0].shape[2], ks[0].shape[2])
        for q, k, o, l in zip(qs, ks, outs, lses):
            flash_mla_with_kvcache(q, k, bt, sl, DV, meta, splits, causal=True, out=o, lse=l)
        return outs[0].float().sum()

    outs = [torch.full((c.b, c.s_q, c.h_q, DV), math.nan, dtype=c.dtype, device="cuda") for c in layers]
    lses = [torch.full((c.b, c.h_q, c.s_q), math.nan, device="cuda") for c in layers]
    compiled = torch.compile(step, backend=backend, fullgraph=True)
    total = compiled([c.q for c in layers], [c.k_cache for c in layers], layers[0].block_table,
                     layers[0].cache_seqlens, outs, lses)
    for i, (o, l, case) in enumerate(zip(outs, lses, layers)):
        check_decode(o, l, *reference(case), case.dtype, what=f"{backend} layer {i}")
    assert torch.isfinite(total)
    torch._dynamo.reset()


def test_compile_sched_object_path(make_case, check_decode, seed):
    """The later-FlashMLA scheduler object under torch.compile (graph breaks allowed)."""
    torch._dynamo.reset()
    case = make_case(5, 2, 16, 1, "mixed", torch.bfloat16, seed=seed)

    def step(q, k, bt, sl):
        sched, _ = get_mla_metadata()
        out1, lse1 = flash_mla_with_kvcache(q, k, bt, sl, DV, sched, None, causal=True)
        out2, lse2 = flash_mla_with_kvcache(q, k, bt, sl, DV, sched, None, causal=True)
        return out1, lse1, out2, lse2

    out1, lse1, out2, lse2 = torch.compile(step, backend="aot_eager")(case.q, case.k_cache, case.block_table,
                                                                      case.cache_seqlens)
    ref = reference(case)
    check_decode(out1, lse1, *ref, case.dtype, what="first call")
    check_decode(out2, lse2, *ref, case.dtype, what="second call")
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------
# out= / lse=
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("given", ["both", "out", "lse"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_preallocated_outputs(given, kernel, make_case, check_decode, seed):
    if not kernel_runs(kernel):
        pytest.skip(f"kernel {kernel} does not run here")
    case = make_case(7, 2, 64, 1, "edge", torch.bfloat16, seed=seed)
    meta, splits = metadata(case)
    # Views into larger NaN-filled buffers (16-byte aligned): the neighbours must stay NaN.
    out_buf = torch.full((case.b + 2, case.s_q, case.h_q, DV), math.nan, dtype=case.dtype, device="cuda")
    lse_buf = torch.full((case.b + 2, case.h_q, case.s_q), math.nan, device="cuda")
    kwargs = {}
    if given in ("both", "out"):
        kwargs["out"] = out_buf[1:-1]
    if given in ("both", "lse"):
        kwargs["lse"] = lse_buf[1:-1]
    out, lse = decode(case, meta, splits, kernel=kernel, **kwargs)
    for name in kwargs:
        assert (out, lse)[name == "lse"] is kwargs[name], f"{name} is not the given tensor"
    check_decode(out, lse, *reference(case), case.dtype, what=f"{kernel} out={given}")
    if "out" in kwargs:
        assert torch.isnan(out_buf[0].float()).all() and torch.isnan(out_buf[-1].float()).all()
    if "lse" in kwargs:
        assert torch.isnan(lse_buf[0]).all() and torch.isnan(lse_buf[-1]).all()


def test_preallocated_outputs_checked(make_case, seed):
    case = make_case(3, 1, 16, 1, [5, 70, 0], torch.bfloat16, seed=seed)
    meta, splits = metadata(case)
    good_out = torch.empty((3, 1, 16, DV), dtype=torch.bfloat16, device="cuda")
    good_lse = torch.empty((3, 16, 1), device="cuda")
    bad = [
        (dict(out=good_out.cpu(), lse=good_lse), ValueError, "out"),
        (dict(out=good_out, lse=good_lse.cpu()), ValueError, "lse"),
        (dict(out=good_out.half(), lse=good_lse), TypeError, "out"),
        (dict(out=good_out, lse=good_lse.double()), TypeError, "lse"),
        (dict(out=good_out[:2], lse=good_lse), ValueError, "out"),
        (dict(out=good_out, lse=torch.empty((3, 1, 16), device="cuda")), ValueError, "lse"),
        (dict(out=torch.empty((16, 3, 1, DV), dtype=torch.bfloat16, device="cuda").permute(1, 2, 0, 3),
              lse=good_lse), ValueError, "out"),
        (dict(out=torch.empty(3 * 16 * DV + 8, dtype=torch.bfloat16, device="cuda")[4:4 + 3 * 16 * DV]
              .view(3, 1, 16, DV), lse=good_lse), ValueError, "out"),
    ]
    for kwargs, exc, name in bad:
        with pytest.raises(exc, match=name):
            decode(case, meta, splits, **kwargs)
    torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------
# CUDA graphs: several layers, one metadata
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("meta_in_graph", [False, True], ids=["meta_outside", "meta_inside"])
def test_cuda_graph_layers_share_metadata(meta_in_graph, make_case, check_decode, seed):
    layers = _layers(make_case, seed, b=9, s_q=2, h_q=64, n=4, lengths="long")
    base = layers[0]
    meta_box = {}
    if not meta_in_graph:
        meta_box["ms"] = metadata(base)
    # Layers 0 and 2 write into preallocated buffers, 1 and 3 allocate (from the graph's pool).
    bufs = {i: (torch.empty((base.b, base.s_q, base.h_q, DV), dtype=base.dtype, device="cuda"),
                torch.empty((base.b, base.h_q, base.s_q), device="cuda")) for i in (0, 2)}

    def step():
        meta, splits = metadata(base) if meta_in_graph else meta_box["ms"]
        results = []
        for i, case in enumerate(layers):
            out, lse = bufs.get(i, (None, None))
            results.append(flash_mla_with_kvcache(case.q, case.k_cache, base.block_table, base.cache_seqlens, DV,
                                                  meta, splits, causal=True, out=out, lse=lse))
        return results

    graph, results = capture_graph(step)
    for i, (out, lse) in enumerate(results):
        if i in bufs:
            assert out is bufs[i][0] and lse is bufs[i][1]
    for replay in range(2):
        if replay:  # new contents for every layer (in place): the replay must see them
            for i, case in enumerate(layers):
                fresh = case.with_new_data(seed + 1000 + i)
                case.q.copy_(fresh.q)
                case.k_cache.copy_(fresh.k_cache)
        graph.replay()
        torch.cuda.synchronize()
        for i, ((out, lse), case) in enumerate(zip(results, layers)):
            check_decode(out, lse, *reference(case), case.dtype, what=f"replay {replay} layer {i}")


# ----------------------------------------------------------------------------------------------
# check_inputs=True
# ----------------------------------------------------------------------------------------------


def test_check_inputs_accepts_valid_junk_tails(make_case, check_decode, seed):
    """make_case poisons block_table past each request's pages (-1, 2^31 - 1, ...) and the cache
    slots past L with NaN: all legal, so the check passes and the result is right."""
    case = make_case(13, 2, 16, 1, "edge", torch.bfloat16, seed=seed)
    meta, splits = metadata(case)
    out, lse = decode(case, meta, splits, check_inputs=True)
    check_decode(out, lse, *reference(case), case.dtype, what="check_inputs")
    sched, _ = get_mla_metadata()
    out, lse = decode(case, sched, None, check_inputs=True)
    check_decode(out, lse, *reference(case), case.dtype, what="check_inputs sched")


def _bad_page_case(make_case, seed):
    case = make_case(4, 1, 16, 1, [200, 64, 129, 5], torch.bfloat16, seed=seed, table_width=5)
    return case


@pytest.mark.parametrize("value", [-1, 10 ** 9, 2 ** 31 - 1, -(2 ** 31), "num_blocks"])
def test_check_inputs_bad_page(value, make_case, seed):
    case = _bad_page_case(make_case, seed)
    meta, splits = metadata(case)
    v = case.num_blocks if value == "num_blocks" else value
    case.block_table[2, 2] = v  # request 2 (129 tokens) uses columns 0..2
    case.block_table[3, 0] = -5  # a later problem: the first one is reported
    with pytest.raises(ValueError, match=rf"check_inputs: block_table\[2, 2\] = {v} .*num_blocks = "
                                         rf"{case.num_blocks}\).*2 invalid"):
        decode(case, meta, splits, check_inputs=True)


@pytest.mark.parametrize("length", [-1, -(2 ** 31), "capacity+1", 2 ** 31 - 1, 2 ** 31 - 63])
def test_check_inputs_bad_length(length, make_case, seed):
    case = _bad_page_case(make_case, seed)
    capacity = 64 * case.block_table.shape[1]
    L = capacity + 1 if length == "capacity+1" else length
    case.cache_seqlens[1] = L
    meta, splits = metadata(case)  # planning tolerates any length
    with pytest.raises(ValueError, match=rf"check_inputs: cache_seqlens\[1\] = {L} is outside \[0, "
                                         rf"64 \* max_blocks_per_seq = {capacity}\]"):
        decode(case, meta, splits, check_inputs=True)
    torch.cuda.synchronize()


def test_check_inputs_length_at_capacity_is_valid(make_case, check_decode, seed):
    case = make_case(2, 1, 16, 1, [320, 1], torch.bfloat16, seed=seed, table_width=5)
    meta, splits = metadata(case)
    out, lse = decode(case, meta, splits, check_inputs=True)
    check_decode(out, lse, *reference(case), case.dtype, what="L = 64 * max_blocks_per_seq")


# check_inputs with other page sizes: every limit follows k_cache's page size. The cases are
# chosen so that a check still using 64-token pages would get each one wrong.

SMALL_AND_LARGE_PAGES = pytest.mark.parametrize("page", [16, 256], ids=["page16", "page256"])


@SMALL_AND_LARGE_PAGES
def test_check_inputs_page_sizes_accept_valid_junk_tails(page, make_case, check_decode, seed):
    """Junk in every block_table column from ceil(L / page) on is legal (with 256-token pages a
    64-token-page check would read those columns as used); NaN past L too."""
    lens = page_edge_lengths(page)
    case = make_case(len(lens), 2, 16, 1, lens, torch.bfloat16, seed=seed, page=page)
    meta, splits = metadata(case)
    out, lse = decode(case, meta, splits, check_inputs=True)
    check_decode(out, lse, *reference(case), case.dtype, what=f"page {page} check_inputs")


def _page_check_case(make_case, seed, page):
    """Four requests; request 2 uses several columns of a 6-column table, the table has junk
    past every request's pages."""
    lens = {16: [70, 16, 65, 5], 256: [700, 64, 257, 5]}[page]
    return make_case(4, 1, 16, 1, lens, torch.bfloat16, seed=seed, page=page, table_width=6)


@SMALL_AND_LARGE_PAGES
def test_check_inputs_page_sizes_bad_page(page, make_case, check_decode, seed):
    """A bad entry in the last column request 2 uses (ceil(L / page) - 1) is found; the same
    value one column further (past its pages) is legal."""
    case = _page_check_case(make_case, seed, page)
    meta, splits = metadata(case)
    used = -(-case.seqlens[2] // page)
    junk_tail = case.block_table[2, used].item()
    last = case.block_table[2, used - 1].item()
    case.block_table[2, used - 1] = -7
    with pytest.raises(ValueError, match=rf"check_inputs: block_table\[2, {used - 1}\] = -7 .*num_blocks = "
                                         rf"{case.num_blocks}\)"):
        decode(case, meta, splits, check_inputs=True)
    case.block_table[2, used - 1] = last
    case.block_table[2, used] = -7
    out, lse = decode(case, meta, splits, check_inputs=True)
    check_decode(out, lse, *reference(case), case.dtype, what=f"page {page}, junk at column {used}")
    case.block_table[2, used] = junk_tail


@SMALL_AND_LARGE_PAGES
def test_check_inputs_page_sizes_length_limit(page, make_case, check_decode, seed):
    """cache_seqlens up to page * max_blocks_per_seq is valid; one more raises with that limit
    in the message ("16 * max_blocks_per_seq = 96")."""
    case = _page_check_case(make_case, seed, page)
    capacity = page * case.block_table.shape[1]
    meta, splits = metadata(case)
    case.cache_seqlens[1] = capacity + 1
    with pytest.raises(ValueError, match=rf"check_inputs: cache_seqlens\[1\] = {capacity + 1} is outside "
                                         rf"\[0, {page} \* max_blocks_per_seq = {capacity}\]"):
        decode(case, meta, splits, check_inputs=True)
    # At the limit: every column of request 1 is used, so they must all be pages of k_cache.
    full = make_case(2, 1, 16, 1, [capacity, 3], torch.bfloat16, seed=seed + 1, page=page, table_width=6)
    assert full.block_table.shape[1] == 6
    meta, splits = metadata(full)
    out, lse = decode(full, meta, splits, check_inputs=True)
    check_decode(out, lse, *reference(full), full.dtype, what=f"page {page}, L = {capacity}")


@SMALL_AND_LARGE_PAGES
def test_ops_check_paged_inputs_page_size(page, make_case, seed):
    """ops.check_paged_inputs(..., page_size=page) checks ceil(L / page) columns and lengths up
    to page * max_blocks_per_seq; without page_size it checks as for 64-token pages."""
    case = _page_check_case(make_case, seed, page)
    result = torch.full((ops.INPUT_CHECK_WORDS,), 77, dtype=torch.int64, device="cuda")
    stream = torch.cuda.current_stream()
    width = case.block_table.shape[1]
    capacity = page * width

    def verdict(**kwargs):
        ops.check_paged_inputs(case.block_table, case.cache_seqlens, case.num_blocks, result, stream, **kwargs)
        return result.tolist()[:5]

    assert verdict(page_size=page) == [0, 0, 0, 0, 0]
    bad = case.num_blocks + 1
    if page == 16:
        # Request 0 (70 tokens) uses columns 0..4 of 16 tokens, 0..1 of 64 tokens.
        assert verdict() == [0, 0, 0, 0, 0]
        saved = case.block_table[0, 4].item()
        case.block_table[0, 4] = bad
        assert verdict(page_size=16) == [2, 0, 4, bad, 1]
        assert verdict() == [0, 0, 0, 0, 0]
        case.block_table[0, 4] = saved
    else:
        # Request 0 (700 tokens) uses columns 0..2 of 256 tokens; for 64-token pages it would
        # need 11 columns of the 6 there are.
        assert verdict()[:4] == [1, 0, -1, 700]
        saved = case.block_table[2, 1].item()
        case.block_table[2, 1] = bad  # request 2 (257 tokens) uses columns 0..1
        assert verdict(page_size=256) == [2, 2, 1, bad, 1]
        case.block_table[2, 1] = saved
    case.cache_seqlens[3] = capacity
    assert verdict(page_size=page)[0] != 1  # at the limit (its junk columns are now used)
    case.cache_seqlens[3] = capacity + 1
    assert verdict(page_size=page) == [1, 3, -1, capacity + 1, 1]
    message = ops.input_check_error(verdict(page_size=page), case.num_blocks, width, page_size=page)
    assert message is not None and f"cache_seqlens[3] = {capacity + 1}" in message
    assert f"{page} * max_blocks_per_seq = {capacity}]" in message, message


def test_check_inputs_refused_duringcapture_graph(make_case, seed):
    case = make_case(2, 1, 16, 1, [70, 5], torch.bfloat16, seed=seed)
    meta, splits = metadata(case)
    decode(case, meta, splits)  # warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="capture"):
        with torch.cuda.graph(graph):
            decode(case, meta, splits, check_inputs=True)
    torch.cuda.synchronize()


def test_ops_check_paged_inputs_result_words(make_case, seed):
    case = _bad_page_case(make_case, seed)
    result = torch.full((ops.INPUT_CHECK_WORDS,), 77, dtype=torch.int64, device="cuda")
    stream = torch.cuda.current_stream()
    ops.check_paged_inputs(case.block_table, case.cache_seqlens, case.num_blocks, result, stream)
    assert result.tolist()[:5] == [0, 0, 0, 0, 0]
    case.block_table[0, 3] = case.num_blocks + 3
    case.cache_seqlens[3] = -4
    ops.check_paged_inputs(case.block_table, case.cache_seqlens, case.num_blocks, result, stream)
    code, req, col, value, count = result.tolist()[:5]
    assert (code, req, col, value, count) == (2, 0, 3, case.num_blocks + 3, 2)
    case.block_table[0, 3] = 0
    ops.check_paged_inputs(case.block_table, case.cache_seqlens, case.num_blocks, result, stream)
    assert result.tolist()[:5] == [1, 3, -1, -4, 1]
    # zero requests: a clean verdict
    empty = torch.empty((0, 3), dtype=torch.int32, device="cuda")
    ops.check_paged_inputs(empty, torch.empty((0,), dtype=torch.int32, device="cuda"), 0, result, stream)
    assert result.tolist()[:5] == [0, 0, 0, 0, 0]


# ----------------------------------------------------------------------------------------------
# determinism
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", KERNELS)
def test_repeated_calls_bitwise_identical(kernel, make_case, seed):
    if not kernel_runs(kernel):
        pytest.skip(f"kernel {kernel} does not run here")
    # One long request split over many SM parts (the combine path) and short ones.
    case = make_case(6, 2, 64, 1, [9000, 3, 0, 700, 4097, 64], torch.bfloat16, seed=seed)
    meta, splits = metadata(case)
    first_out, first_lse = decode(case, meta, splits, kernel=kernel)
    out_buf, lse_buf = torch.empty_like(first_out), torch.empty_like(first_lse)
    for i in range(5):
        out, lse = decode(case, meta, splits, kernel=kernel)
        assert_bitwise_equal(out, first_out, f"{kernel} out, call {i}")
        assert_bitwise_equal(lse, first_lse, f"{kernel} lse, call {i}")
        decode(case, meta, splits, kernel=kernel, out=out_buf, lse=lse_buf)
        assert_bitwise_equal(out_buf, first_out, f"{kernel} out=, call {i}")
        assert_bitwise_equal(lse_buf, first_lse, f"{kernel} lse=, call {i}")
    # A fresh plan of the same lengths is the same plan: same bits again.
    meta2, splits2 = metadata(case)
    assert torch.equal(meta, meta2) and torch.equal(splits, splits2)
    out, lse = decode(case, meta2, splits2, kernel=kernel)
    assert_bitwise_equal(out, first_out, f"{kernel} out, new plan")


# ----------------------------------------------------------------------------------------------
# two streams
# ----------------------------------------------------------------------------------------------


def test_two_streams_concurrent(make_case, check_decode, seed):
    """Two decoding problems of different shapes on two streams at once, 8 rounds each: both
    streams' results are right, and every round equals the first (no cross-talk)."""
    a = make_case(32, 1, 128, 1, "long", torch.bfloat16, seed=seed)
    b = make_case(5, 4, 16, 2, "mixed", torch.float16, seed=seed + 1, q_layout="bhsd")
    ref_a, ref_b = reference(a), reference(b)
    torch.cuda.synchronize()
    sa, sb = torch.cuda.Stream(), torch.cuda.Stream()
    results = {"a": [], "b": []}
    for stream in (sa, sb):
        stream.wait_stream(torch.cuda.current_stream())
    for _ in range(8):
        with torch.cuda.stream(sa):
            torch.cuda._sleep(20_000)
            meta, splits = metadata(a)  # planned on its own stream
            results["a"].append(decode(a, meta, splits))
        with torch.cuda.stream(sb):
            meta, splits = metadata(b)
            results["b"].append(decode(b, meta, splits))
    torch.cuda.current_stream().wait_stream(sa)
    torch.cuda.current_stream().wait_stream(sb)
    torch.cuda.synchronize()
    for name, case, ref in (("a", a, ref_a), ("b", b, ref_b)):
        first_out, first_lse = results[name][0]
        check_decode(first_out, first_lse, *ref, case.dtype, what=f"stream {name}")
        for i, (out, lse) in enumerate(results[name][1:], 1):
            assert_bitwise_equal(out, first_out, f"stream {name} round {i} out")
            assert_bitwise_equal(lse, first_lse, f"stream {name} round {i} lse")
