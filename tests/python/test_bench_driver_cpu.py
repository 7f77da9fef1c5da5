"""The benchmark's GPU driver (benchmarks/bench_decode.py: run_kernel with --compare and
--eager) run on the CPU: torch.cuda's events, streams and graphs are replaced by host stand-ins
and the decode call by a small float32 torch implementation, so the bookkeeping (sanity check,
agreement of the two modules, interleaved timing, eager loop, summaries) runs without a GPU.
The timings mean nothing here; the GPU run checks them."""

import argparse
import contextlib
import functools
import importlib.util
import math
import pathlib
import time
import types

import pytest

torch = pytest.importorskip("torch")

FP8 = torch.float8_e4m3fn
KV_FORMATS = pathlib.Path(__file__).resolve().parents[2] / "python" / "flash_mla" / "kv_formats.py"


@functools.lru_cache(maxsize=None)
def kv_formats():
    """flash_mla/kv_formats.py (plain torch) loaded from its file: the benchmark's quantizer,
    without the compiled module the package would import."""
    spec = importlib.util.spec_from_file_location("kv_formats_under_test", KV_FORMATS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FakeEvent:
    def __init__(self, enable_timing=False):
        self.t = None

    def record(self, stream=None):
        self.t = time.perf_counter()

    def elapsed_time(self, end):
        return (end.t - self.t) * 1e3


class FakeStream:
    def wait_stream(self, other):
        pass


class FakeGraph:
    """Replays take a fixed host time (the captured calls ran once, eagerly, at capture)."""
    replay_s = 2e-4

    def replay(self):
        time.sleep(self.replay_s)


class SlowGraph(FakeGraph):
    replay_s = 4e-4


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda's timing and graph API as host stand-ins; counts the graphs captured."""
    captured = []

    @contextlib.contextmanager
    def graph(g, *args, **kwargs):
        captured.append(g)
        yield

    for name, value in dict(synchronize=lambda *a: None, Event=FakeEvent, Stream=FakeStream,
                            current_stream=lambda *a: FakeStream(),
                            stream=lambda s: contextlib.nullcontext(), CUDAGraph=FakeGraph,
                            graph=graph).items():
        monkeypatch.setattr(torch.cuda, name, value, raising=False)
    return captured


def decode(q, k_cache, block_table, cache_seqlens, head_dim_v, causal, zero_out=False, descale_q=None,
           descale_k=None):
    """float32 MLA decode of the API's contract, on any device (small cases only); FP8 inputs
    are multiplied by their descales, out is then bfloat16 for an FP8 q."""
    b, s_q, h_q, d = q.shape
    page, h_kv = k_cache.shape[1], k_cache.shape[2]
    g = h_q // h_kv
    out = torch.zeros(b, s_q, h_q, head_dim_v, dtype=torch.bfloat16 if q.dtype == FP8 else q.dtype)
    if descale_k is not None:
        k_cache = k_cache.float() * descale_k
    if descale_q is not None:
        q = q.float() * descale_q
    lse = torch.full((b, h_q, s_q), float("inf"))
    heads = torch.arange(h_q) // g
    for i in range(b):
        L = int(cache_seqlens[i])
        n = (L + page - 1) // page
        K = k_cache[block_table[i, :n].long()].reshape(n * page, h_kv, d)[:L].float()
        K = K.permute(1, 0, 2)[heads]  # (h_q, L, d)
        for t in range(s_q):
            limit = L - s_q + t if causal and s_q > 1 else L - 1
            if limit < 0:
                continue
            Kt = K[:, :limit + 1]
            S = torch.einsum("hd,hld->hl", q[i, t].float(), Kt) / math.sqrt(d)
            m = torch.logsumexp(S, dim=-1)
            O = torch.einsum("hl,hld->hd", torch.exp(S - m[:, None]), Kt[..., :head_dim_v])
            out[i, t] = 0 if zero_out else O.to(out.dtype)
            lse[i, :, t] = m
    return out, lse


def fake_module(name, zero_out=False, seqlen_q_param=False, fail=None, ignore_descale_k=False):
    mod = types.ModuleType(name)
    mod.calls = {"metadata": [], "decode": 0}

    def get_mla_metadata(cache_seqlens, num_q_tokens_per_head_k, num_heads_k, **kw):
        mod.calls["metadata"].append(kw)
        return torch.zeros(4, 8, dtype=torch.int32), torch.zeros(len(cache_seqlens) + 1,
                                                                  dtype=torch.int32)

    if seqlen_q_param:
        def get_mla_metadata_sq(cache_seqlens, num_q_tokens_per_head_k, num_heads_k,
                                seqlen_q=None):
            return get_mla_metadata(cache_seqlens, num_q_tokens_per_head_k, num_heads_k,
                                    seqlen_q=seqlen_q)
        mod.get_mla_metadata = get_mla_metadata_sq
    else:
        mod.get_mla_metadata = get_mla_metadata

    def flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v,
                               tile_scheduler_metadata, num_splits, softmax_scale=None,
                               causal=False, kernel="auto", descale_q=None, descale_k=None):
        if fail:
            raise RuntimeError(fail)
        mod.calls["decode"] += 1
        if ignore_descale_k and descale_k is not None:  # a kernel that forgets the cache's scale
            descale_k = torch.ones_like(descale_k)
        return decode(q, k_cache, block_table, cache_seqlens, head_dim_v, causal, zero_out, descale_q, descale_k)

    mod.flash_mla_with_kvcache = flash_mla_with_kvcache
    mod.kv_formats = kv_formats()
    mod.kernel_for_device = lambda device, kernel: "fake"
    mod.__version__ = "0.test"
    return mod


def make_args(**kw):
    base = dict(seed=0, pages="shuffled", l2_factor=4.0, max_sets=2, no_spot_check=False,
                calls_per_graph=2, reps=3, warmup=1, burst=True, cool=0.0, eager=True,
                eager_calls=3, replays_per_round=0)
    base.update(kw)
    return argparse.Namespace(**base)


class NoClock:
    def window(self, t0, t1):
        return None


def run_case(bench, other_module, case=None, args=None):
    case = case or bench.Case("imbalanced", None, 2, 4, 1, lens=[70, 200, 5], causal=True)
    args = args or make_args()
    ours = fake_module("ours")
    inp = bench.Inputs(torch, case, args, torch.device("cpu"), torch.bfloat16, l2_bytes=10**6)
    meta, splits = ours.get_mla_metadata(inp.cache_seqlens, case.s_q * case.h_q, 1)
    other = None
    if other_module is not None:
        other = bench.Compared(other_module)
        other.prepare(torch, case, inp)
    res = bench.run_kernel(torch, ours, case, inp, meta, splits, "auto", args,
                           {"gemm": {"tflops": 100.0}, "copy": {"gbps": 1000.0}}, NoClock(),
                           other)
    return case, inp, res


def test_driver_with_an_agreeing_module(bench, fake_cuda):
    theirs = fake_module("theirs", seqlen_q_param=True)
    case, inp, res = run_case(bench, theirs)
    assert inp.n_sets == 2
    assert res["sanity"]["ok"], res["sanity"]
    assert res["timing"] == "graph" and res["calls_per_graph"] == 2
    assert len(fake_cuda) == 2  # one graph each
    cmp = res["compare"]
    assert theirs.calls["metadata"] == [{"seqlen_q": 2}]
    assert cmp["agreement"]["ok"], cmp["agreement"]
    assert cmp["agreement"]["out_max_abs_diff"] == 0.0
    assert cmp["rounds"] == 3 and cmp["ratio"] > 0 and cmp["ms"] > 0
    assert res["replays_per_round"] == cmp["replays_per_round"] >= 1
    for e in (res["eager"], cmp["eager"]):
        assert e["calls"] == 3 and e["wall_us"] > 0 and e["host_us"] > 0
    assert cmp["eager_ratio"] > 0 and cmp["host_ratio"] > 0
    assert res["pct_gemm"] > 0 and res["pct_copy"] > 0
    assert not bench.row_failed(res)

    report = {"cases": [dict(case.describe(), results=[res])], "kernels": ["auto"],
              "compare": {"label": "theirs 0.test"}, "ceilings": {}}
    report["compare_summary"] = bench.compare_summary(report)
    assert report["compare_summary"]["graph"]["n"] == 1
    assert report["compare_summary"]["eager"]["n"] == 1
    text = bench.format_report(report)
    assert "1 of 1 compared rows agree" in text
    bench.write_json(None, report)


def test_driver_interleaves_and_reports_the_ratio(bench, fake_cuda, monkeypatch):
    """Theirs' graph replays twice as long as ours: the ratio says so."""
    graphs = iter([FakeGraph(), SlowGraph()])
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: next(graphs))
    _, _, res = run_case(bench, fake_module("theirs"), args=make_args(reps=5, burst=False,
                                                                      eager=False))
    cmp = res["compare"]
    assert "burst_ms" not in res and "eager" not in res and "eager" not in cmp
    # Sleep-based replays: 2x nominal; a loaded 2-core machine stretches sleeps unevenly, so the
    # bounds only check that the slower module is reported as clearly slower.
    assert 1.3 < cmp["ratio"] < 4.0, cmp
    assert 1.3 < cmp["ratio_paired_median"] < 4.0


def test_driver_flags_a_disagreeing_module(bench, fake_cuda):
    _, _, res = run_case(bench, fake_module("broken", zero_out=True))
    a = res["compare"]["agreement"]
    assert not a["ok"] and "out max diff" in "; ".join(a["problems"])
    assert res["sanity"]["ok"]  # ours is fine; the row still fails
    assert bench.row_failed(res)
    assert bench.agree_label(res["compare"]).startswith("DIFF")


def test_driver_reports_a_failing_module_and_times_ours(bench, fake_cuda):
    _, _, res = run_case(bench, fake_module("failing", fail="h_q=4 not supported"))
    cmp = res["compare"]
    assert "h_q=4 not supported" in cmp["error"] and "ratio" not in cmp
    assert res["timing"] == "graph" and res["ms"] > 0 and len(fake_cuda) == 1
    assert not bench.row_failed(res)


def test_driver_without_compare_keeps_the_plain_timing(bench, fake_cuda):
    _, _, res = run_case(bench, None, args=make_args(eager=False))
    assert "compare" not in res and "eager" not in res
    assert res["replays_per_round"] == 1 and res["reps"] == 3 and res["burst_ms"] > 0
    assert len(fake_cuda) == 1


def test_agreement_tolerances(bench):
    out = torch.randn(2, 1, 4, 8)
    lse = torch.randn(2, 4, 1) + 5
    ok = bench.agreement(torch, out, lse, out + 0.01 * out.abs().max(), lse + 5e-3)
    assert ok["ok"], ok
    bad = bench.agreement(torch, out, lse, out, lse + 0.1)
    assert not bad["ok"] and "lse max diff" in bad["problems"][0]
    t_lse = lse.clone()
    t_lse[0, 0, 0] = float("inf")
    bad = bench.agreement(torch, out, lse, out, t_lse)
    assert not bad["ok"] and bad["lse_nonfinite_mismatch"] == 1
    bad = bench.agreement(torch, out, lse, out[:1], lse)
    assert not bad["ok"] and "shapes" in bad["problems"][0]


# ----------------------------------------------------------------------------------------------
# page sizes: --page-size (ours in N-token pages, the compared module in a 64-token copy) and
# --page-sizes (every page size timed interleaved, compared with the 64-token output)
# ----------------------------------------------------------------------------------------------


def _tokens(inp, case, set_idx=0):
    """(sum of lens, h_kv, d) float32: every request's tokens in order, read through its table."""
    rows = []
    for i, L in enumerate(case.lens):
        n = (L + inp.page - 1) // inp.page
        k = inp.ks[set_idx][inp.block_table[i, :n].long()].reshape(n * inp.page, case.h_kv, inp.ks[0].shape[-1])
        rows.append(k[:L].float())
    return torch.cat(rows)


@pytest.mark.parametrize("pages", ["contiguous", "shuffled"])
@pytest.mark.parametrize("page", [16, 32, 128, 256])
def test_inputs_page_size_and_64_token_copy(bench, page, pages):
    """Inputs in `page`-token pages: ceil(L / page) pages a request, NaN past L in each last
    page; with_page(64) holds the same tokens (and shares the queries)."""
    case = bench.Case("imbalanced", None, 2, 4, 1, lens=[70, 200, 5, 0, 129], causal=True)
    case.set_page(page)
    assert case.name.endswith(f" page={page}") and case.describe()["page_block_size"] == page
    args = make_args(pages=pages)
    dev = torch.device("cpu")
    inp = bench.Inputs(torch, case, args, dev, torch.bfloat16, l2_bytes=10**6)
    assert inp.page == page and tuple(inp.ks[0].shape[:2]) == (inp.num_pages, page)
    assert inp.num_pages == sum((L + page - 1) // page for L in case.lens)
    assert inp.block_table.shape[1] == max((L + page - 1) // page for L in case.lens)
    flat = inp.ks[0].reshape(-1, case.h_kv, bench.D)
    assert int(torch.isnan(flat[:, 0, 0].float()).sum()) == inp.num_pages * page - sum(case.lens)
    ours = _tokens(inp, case)
    assert torch.isfinite(ours).all()
    copy = inp.with_page(torch, case, args, dev, bench.PAGE)
    assert copy.page == 64 and copy.ks[0].shape[1] == 64 and copy.n_sets == inp.n_sets
    assert copy.qs is inp.qs
    for s in range(inp.n_sets):
        assert torch.equal(_tokens(copy, case, s), _tokens(inp, case, s))
    assert inp.with_page(torch, case, args, dev, page) is inp


def test_driver_page_size_16_compares_with_a_64_token_copy(bench, fake_cuda):
    """--page-size 16 --compare: ours decodes 16-token pages, theirs the 64-token copy of the
    same cache; the outputs agree and the row passes."""
    case = bench.Case("imbalanced", None, 2, 4, 1, lens=[70, 200, 5], causal=True)
    case.set_page(16)
    args = make_args()
    dev = torch.device("cpu")
    ours = fake_module("ours")
    theirs = fake_module("theirs")
    inp = bench.Inputs(torch, case, args, dev, torch.bfloat16, l2_bytes=10**6)
    other = bench.Compared(theirs)
    other.prepare(torch, case, inp.with_page(torch, case, args, dev, bench.PAGE))
    assert other.inp.ks[0].shape[1] == 64 and inp.ks[0].shape[1] == 16
    meta, splits = ours.get_mla_metadata(inp.cache_seqlens, case.s_q * case.h_q, 1)
    res = bench.run_kernel(torch, ours, case, inp, meta, splits, "auto", args, {}, NoClock(), other)
    assert res["sanity"]["ok"], res["sanity"]
    assert res["compare"]["agreement"]["ok"], res["compare"]["agreement"]
    assert not bench.row_failed(res)


def _page_module(broken_page=None):
    """A fake flash_mla whose decode returns zeros for one page size (a page-size bug)."""
    mod = fake_module("ours")
    good = mod.flash_mla_with_kvcache

    def flash_mla_with_kvcache(q, k_cache, *args, **kwargs):
        out, lse = good(q, k_cache, *args, **kwargs)
        if k_cache.shape[1] == broken_page:
            out = torch.zeros_like(out)
        return out, lse

    mod.flash_mla_with_kvcache = flash_mla_with_kvcache
    return mod


def _run_page_sizes(bench, module, page_sizes=(16, 32, 64, 128, 256), **kw):
    case = bench.Case("imbalanced", None, 2, 4, 1, lens=[70, 200, 5, 1], causal=True)
    args = make_args(**kw)
    dev = torch.device("cpu")
    inp = bench.Inputs(torch, case, args, dev, torch.bfloat16, l2_bytes=10**6)
    variants = {p: inp.with_page(torch, case, args, dev, p) for p in page_sizes}
    meta, splits = module.get_mla_metadata(inp.cache_seqlens, case.s_q * case.h_q, 1)
    res = bench.run_page_sizes(torch, module, case, variants, meta, splits, "auto", args,
                               {"gemm": {"tflops": 100.0}, "copy": {"gbps": 1000.0}}, NoClock())
    return case, res


def test_driver_page_sizes_interleaved(bench, fake_cuda):
    case, res = _run_page_sizes(bench, _page_module())
    ps = res["page_sizes"]
    assert sorted(int(k) for k in ps["pages"]) == [16, 32, 64, 128, 256]
    assert len(fake_cuda) == 5  # one graph per page size
    # The row's own figures are the 64-token ones of the interleaved timing.
    assert res["timing"] == "graph" and res["ms"] == ps["pages"]["64"]["ms"] and res["sanity"]["ok"]
    assert res["pct_gemm"] > 0 and res["pct_copy"] > 0 and res["reps"] == 3 and "burst_ms" not in res
    for key, e in ps["pages"].items():
        assert e["sanity"]["ok"], (key, e)
        assert e["ms"] > 0 and e["rounds"] == 3 and e["ratio"] > 0, (key, e)
        if key != "64":
            assert e["agreement"]["ok"] and e["agreement"]["out_max_abs_diff"] == 0.0, (key, e)
    assert ps["pages"]["64"]["ratio"] == pytest.approx(1.0)
    assert ps["pages"]["16"]["num_pages"] == 5 + 13 + 1 + 1
    assert not bench.page_size_problems(res) and not bench.row_failed(res)
    assert "t(64)/t(page): 16 " in bench.progress_line(case, res)

    report = {"cases": [dict(case.describe(), results=[res])], "kernels": ["auto"], "ceilings": {},
              "settings": {"page_block_size": 64, "page_sizes": [16, 32, 64, 128, 256]}}
    report["page_size_summary"] = bench.page_size_summary(report)
    assert sorted(report["page_size_summary"]["by_page"]) == ["128", "16", "256", "32"]
    assert report["page_size_summary"]["by_page"]["16"]["n"] == 1
    text = bench.format_report(report)
    header = next(line for line in text.splitlines() if line.startswith("case ") and "t(16)" in line)
    assert [c.strip() for c in header.split("|")][2:] == ["t(16)", "t(32)", "t(64)", "t(128)", "t(256)", "64/16",
                                                          "64/32", "64/128", "64/256", "check"]
    assert "page 16 vs 64, CUDA graph, t(64) / t(16): 1 rows" in text
    assert "all agree with the 64-token output" in text
    assert "t(64)/t(page) geomean (min): 16 " in bench.summary_line(report)
    bench.write_json(None, report)


def test_driver_page_sizes_flags_a_page_size_bug(bench, fake_cuda):
    """A page size whose output differs from the 64-token one fails the row."""
    case, res = _run_page_sizes(bench, _page_module(broken_page=32), page_sizes=(32, 64, 256), burst=False)
    problems = bench.page_size_problems(res)
    assert [p for p, _ in problems] == [32] and problems[0][1].startswith("FAIL spot")  # the sanity check
    assert bench.row_failed(res)
    case, res = _run_page_sizes(bench, _page_module(broken_page=32), page_sizes=(32, 64, 256), burst=False,
                                no_spot_check=True)
    problems = bench.page_size_problems(res)
    assert [p for p, _ in problems] == [32] and problems[0][1].startswith("DIFF")  # against page 64
    assert bench.row_failed(res)
    report = {"cases": [dict(case.describe(), results=[res])], "kernels": ["auto"], "ceilings": {}}
    text = bench.format_report(report)
    assert "32: DIFF" in text and "1 failed" in text


# ----------------------------------------------------------------------------------------------
# FP8 caches: --kv-dtype fp8 (every call on FP8 inputs) and --kv-dtypes (16-bit and FP8 timed
# interleaved, compared with each other)
# ----------------------------------------------------------------------------------------------


def _fp8_inputs(bench, case, fp8_q=False, **kw):
    args = make_args(kv_dtype="fp8", fp8_q=fp8_q, **kw)
    inp = bench.Inputs(torch, case, args, torch.device("cpu"), torch.bfloat16, l2_bytes=10**6)
    return args, inp, inp.to_fp8(torch, kv_formats(), fp8_q)


@pytest.mark.parametrize("fp8_q", [False, True], ids=["q_bf16", "q_fp8"])
def test_inputs_to_fp8(bench, fp8_q):
    """to_fp8: every cache set float8_e4m3fn with its own descale_k, NaN codes past each length,
    the tokens within e4m3's rounding of the 16-bit ones; q quantized only with fp8_q; the block
    table shared; with_page keeps the FP8 bytes and descales."""
    case = bench.Case("imbalanced", None, 2, 4, 1, lens=[70, 200, 5, 0, 129], causal=True)
    args, inp, f8 = _fp8_inputs(bench, case, fp8_q)
    assert f8.kv_dtype == "fp8" and inp.kv_dtype is None and inp.ks[0].dtype == torch.bfloat16
    assert f8.block_table is inp.block_table and f8.n_sets == inp.n_sets
    assert len(f8.ks) == len(f8.descale_ks) == inp.n_sets
    for k16, k8, d in zip(inp.ks, f8.ks, f8.descale_ks):
        assert k8.dtype == FP8 and d.dtype == torch.float32 and tuple(d.shape) == (1,)
        nan16 = torch.isnan(k16.float())
        assert torch.equal(torch.isnan(k8.float()), nan16)  # NaN (codes) exactly past each length
        x, y = k16.float()[~nan16], (k8.float() * d)[~nan16]
        assert ((y - x).abs() <= x.abs() * 2.0 ** -4 + d * 2.0 ** -10 + 1e-6).all()
    assert (f8.qs is inp.qs) != fp8_q
    assert f8.out_dtype == torch.bfloat16
    if fp8_q:
        assert all(q.dtype == FP8 for q in f8.qs) and len(f8.descale_qs) == inp.n_sets
        assert set(f8.descales(0)) == {"descale_k", "descale_q"}
    else:
        assert f8.descale_qs is None and set(f8.descales(1)) == {"descale_k"}
    assert inp.descales(0) == {}
    paged = f8.with_page(torch, case, args, torch.device("cpu"), 16)
    assert paged.ks[0].dtype == FP8 and paged.descale_ks is f8.descale_ks and paged.kv_dtype == "fp8"
    for s in range(f8.n_sets):
        assert torch.equal(_tokens(paged, case, s), _tokens(f8, case, s))
    flat = paged.ks[0].reshape(-1, case.h_kv, bench.D)
    assert int(torch.isnan(flat[:, 0, 0].float()).sum()) == paged.num_pages * 16 - sum(case.lens)


def test_inputs_fp8_sets_sized_with_one_byte_elements(bench):
    """An FP8 run sizes its rotation with 1-byte cache elements: twice the sets (up to max_sets)."""
    case = bench.Case("memory", None, 1, 16, 1, lens=[3000] * 8)
    l2 = 20 * 10**6
    sizes = {}
    for kv in ("bf16", "fp8"):
        args = make_args(kv_dtype=kv, max_sets=50)
        sizes[kv] = bench.Inputs(torch, case, args, torch.device("cpu"), torch.bfloat16, l2_bytes=l2)
    assert sizes["fp8"].set_bytes < 0.51 * sizes["bf16"].set_bytes
    assert sizes["fp8"].n_sets >= 2 * sizes["bf16"].n_sets - 1


@pytest.mark.parametrize("fp8_q", [False, True], ids=["q_bf16", "q_fp8"])
def test_driver_fp8_rows(bench, fake_cuda, fp8_q):
    """--kv-dtype fp8: the call gets the FP8 sets and their descales, the sanity check (float32
    on the dequantized values) passes, and the GB/s count 1 byte per FP8 element."""
    case = bench.Case("imbalanced", None, 2, 4, 1, lens=[70, 200, 5], causal=True)
    case.set_fp8(fp8_q)
    assert case.name.endswith(" kv=fp8" + (" q=fp8" if fp8_q else "")) and case.ref is None
    assert case.describe()["kv_dtype"] == "fp8" and case.describe()["fp8_q"] == fp8_q
    assert case.bytes == case.bytes_for(1, 1 if fp8_q else 2) < case.bytes_for(2, 2)
    args, _, inp = _fp8_inputs(bench, case, fp8_q)
    ours = fake_module("ours")
    meta, splits = ours.get_mla_metadata(inp.cache_seqlens, case.s_q * case.h_q, 1)
    res = bench.run_kernel(torch, ours, case, inp, meta, splits, "auto", args,
                           {"gemm": {"tflops": 100.0}, "copy": {"gbps": 1000.0}}, NoClock())
    assert res["sanity"]["ok"], res["sanity"]
    assert res["gbps"] == pytest.approx(case.bytes / (res["ms"] * 1e-3) / 1e9)
    broken = fake_module("ours", ignore_descale_k=True)
    res = bench.run_kernel(torch, broken, case, inp, meta, splits, "auto", args, {}, NoClock())
    assert not res["sanity"]["ok"] and "spot" in "; ".join(res["sanity"]["problems"])


def _run_kv_dtypes(bench, module, fp8_q=False, **kw):
    case = bench.Case("imbalanced", None, 2, 4, 1, lens=[70, 200, 5, 1], causal=True)
    args = make_args(dtype="bf16", kv_dtype="bf16", kv_dtype_list=["bf16", "fp8"], fp8_q=fp8_q, **kw)
    inp = bench.Inputs(torch, case, args, torch.device("cpu"), torch.bfloat16, l2_bytes=10**6)
    variants = {"bf16": inp, "fp8": inp.to_fp8(torch, module.kv_formats, fp8_q)}
    meta, splits = module.get_mla_metadata(inp.cache_seqlens, case.s_q * case.h_q, 1)
    res = bench.run_kv_dtypes(torch, module, case, variants, meta, splits, "auto", args,
                              {"gemm": {"tflops": 100.0}, "copy": {"gbps": 1000.0}}, NoClock())
    return case, res


@pytest.mark.parametrize("fp8_q", [False, True], ids=["q_bf16", "q_fp8"])
def test_driver_kv_dtypes_interleaved(bench, fake_cuda, fp8_q):
    case, res = _run_kv_dtypes(bench, fake_module("ours"), fp8_q)
    ds = res["kv_dtypes"]["dtypes"]
    assert list(ds) == ["bf16", "fp8"] and len(fake_cuda) == 2  # one graph per dtype
    # The row's own figures are the 16-bit ones of the interleaved timing.
    assert res["timing"] == "graph" and res["ms"] == ds["bf16"]["ms"] and res["sanity"]["ok"]
    assert "burst_ms" not in res and res["reps"] == 3
    assert ds["bf16"]["ratio"] == pytest.approx(1.0) and ds["fp8"]["ratio"] > 0
    assert ds["fp8"]["sanity"]["ok"], ds["fp8"]
    assert ds["fp8"]["agreement"]["ok"], ds["fp8"]["agreement"]
    assert ds["fp8"]["agreement"]["out_max_abs_diff"] > 0  # quantized: not the same numbers
    assert ds["fp8"]["fp8_q"] == fp8_q and ds["fp8"]["bytes"] == case.bytes_for(1, 1 if fp8_q else 2)
    assert ds["bf16"]["bytes"] == case.bytes
    for e in ds.values():
        assert e["gbps"] == pytest.approx(e["bytes"] / (e["ms"] * 1e-3) / 1e9)
        assert e["pct_copy"] == pytest.approx(e["gbps"] / 10.0)
    assert not bench.kv_dtype_problems(res) and not bench.row_failed(res)
    assert "t(bf16)/t(fp8) " in bench.progress_line(case, res)

    report = {"cases": [dict(case.describe(), results=[res])], "kernels": ["auto"], "ceilings": {},
              "settings": {"dtype": "bf16", "kv_dtype": "bf16", "kv_dtypes": ["bf16", "fp8"], "fp8_q": fp8_q}}
    report["kv_dtype_summary"] = bench.kv_dtype_summary(report)
    assert list(report["kv_dtype_summary"]["by_dtype"]) == ["fp8"]
    assert report["kv_dtype_summary"]["by_dtype"]["fp8"]["n"] == 1
    text = bench.format_report(report)
    header = next(line for line in text.splitlines() if line.startswith("case ") and "t(fp8)" in line)
    assert [c.strip() for c in header.split("|")][2:] == ["t(bf16)", "t(fp8)", "GB/s(bf16)", "GB/s(fp8)",
                                                          "bf16/fp8", "check"]
    assert "fp8 cache vs bf16, CUDA graph, t(bf16) / t(fp8): 1 rows" in text
    assert "all agree with the 16-bit output" in text
    assert "t(bf16)/t(fp8) geomean " in bench.summary_line(report)
    bench.write_json(None, report)


def test_driver_kv_dtypes_flags_an_fp8_bug(bench, fake_cuda):
    """An FP8 path that ignores descale_k fails the row: its sanity check (float32 on the
    dequantized cache), and without it the comparison with the 16-bit output."""
    broken = fake_module("ours", ignore_descale_k=True)
    case, res = _run_kv_dtypes(bench, broken)
    problems = bench.kv_dtype_problems(res)
    assert [k for k, _ in problems] == ["fp8"] and problems[0][1].startswith("FAIL spot")
    assert bench.row_failed(res)
    case, res = _run_kv_dtypes(bench, broken, no_spot_check=True)
    problems = bench.kv_dtype_problems(res)
    assert [k for k, _ in problems] == ["fp8"] and problems[0][1].startswith("DIFF")
    report = {"cases": [dict(case.describe(), results=[res])], "kernels": ["auto"], "ceilings": {}}
    text = bench.format_report(report)
    assert "fp8: DIFF" in text and "1 failed" in text
