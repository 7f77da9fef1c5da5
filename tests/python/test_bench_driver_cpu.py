"""The benchmark's GPU driver (benchmarks/bench_decode.py: run_kernel with --compare and
--eager) run on the CPU: torch.cuda's events, streams and graphs are replaced by host stand-ins
and the decode call by a small float32 torch implementation, so the bookkeeping (sanity check,
agreement of the two modules, interleaved timing, eager loop, summaries) runs without a GPU.
The timings mean nothing here; the GPU run checks them."""

import argparse
import contextlib
import math
import time
import types

import pytest

torch = pytest.importorskip("torch")


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


def decode(q, k_cache, block_table, cache_seqlens, head_dim_v, causal, zero_out=False):
    """float32 MLA decode of the API's contract, on any device (small cases only)."""
    b, s_q, h_q, d = q.shape
    page, h_kv = k_cache.shape[1], k_cache.shape[2]
    g = h_q // h_kv
    out = torch.zeros(b, s_q, h_q, head_dim_v, dtype=q.dtype)
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
            out[i, t] = 0 if zero_out else O.to(q.dtype)
            lse[i, :, t] = m
    return out, lse


def fake_module(name, zero_out=False, seqlen_q_param=False, fail=None):
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
                               causal=False, kernel="auto"):
        if fail:
            raise RuntimeError(fail)
        mod.calls["decode"] += 1
        return decode(q, k_cache, block_table, cache_seqlens, head_dim_v, causal, zero_out)

    mod.flash_mla_with_kvcache = flash_mla_with_kvcache
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
    assert 1.5 < cmp["ratio"] < 2.5, cmp
    assert 1.5 < cmp["ratio_paired_median"] < 2.5


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
