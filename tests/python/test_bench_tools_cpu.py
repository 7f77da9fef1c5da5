"""The benchmark CLI's GPU-free parts: case listing and the serving sweep, report formatting
(with and without the SM-clock column's data), the nvidia-smi clock sampler where nvidia-smi is
missing, loading the module of --compare, the ratio summaries and the --png chart."""

import importlib.util
import math
import re
import subprocess
import sys

import pytest

from conftest import BENCH_SCRIPT as BENCH


def run_bench(*argv):
    return subprocess.run([sys.executable, str(BENCH), *argv], capture_output=True, text=True,
                          timeout=120)


def table_names(stdout):
    """Case names of the dry run's table (the rows between the separator and 'lengths[')."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("---")) + 1
    names = []
    for line in lines[start:]:
        if "|" not in line:
            break
        names.append(line.split("|")[0].strip())
    return names


def test_dry_run_lists_the_reference_cases():
    res = run_bench("--dry-run")
    assert res.returncode == 0, res.stderr
    for name in ("compute b=128 L=8192 sq=1 hq=128 causal", "memory b=128 L=16384 sq=1 hq=32",
                 "imbalanced b=4 L=4641/45118/1730/1696 sq=4 hq=16 causal"):
        assert name in res.stdout, res.stdout
    assert len(table_names(res.stdout)) == 7
    assert "estimate: 7 rows" in res.stdout and "7 CUDA-graph captures" in res.stdout


def test_dry_run_needs_no_torch(tmp_path):
    """--dry-run imports neither torch nor the library (a torch that fails to import proves it)."""
    (tmp_path / "torch.py").write_text("raise ImportError('torch must not be imported')\n")
    (tmp_path / "flash_mla.py").write_text("raise ImportError('flash_mla must not be imported')\n")
    res = subprocess.run([sys.executable, "-c",
                          f"import sys; sys.path.insert(0, {str(tmp_path)!r}); "
                          f"sys.argv = ['bench', '--sweep', 'serving', '--dry-run']; "
                          f"import runpy; runpy.run_path({str(BENCH)!r}, run_name='__main__')"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "estimate: 34 rows" in res.stdout


SWEEP_ROWS = [
    "short b=128 L=128 sq=1 hq=128", "short b=128 L=256 sq=1 hq=128",
    "short b=128 L=512 sq=1 hq=128", "short b=128 L=1024 sq=1 hq=128",
    "short b=128 L=2048 sq=1 hq=128", "short b=128 L=1024 sq=2 hq=128 causal",
    "short b=32 L=1024 sq=1 hq=128", "short b=128 L=1024 sq=1 hq=64",
    "short b=128 L=1024 sq=1 hq=32", "short b=128 L=1024 sq=1 hq=16",
    "short b=128 L=1024 sq=1 hq=8", "short b=32 L=1024 sq=1 hq=16",
    "compute b=128 L=4096 sq=1 hq=128 causal", "compute b=128 L=8192 sq=1 hq=128 causal",
    "compute b=128 L=32768 sq=1 hq=128 causal", "compute b=128 L=4096 sq=2 hq=128 causal",
    "compute b=128 L=8192 sq=2 hq=128 causal", "compute b=128 L=32768 sq=2 hq=128 causal",
    "compute b=128 L=1024 sq=4 hq=128 causal", "compute b=128 L=4096 sq=4 hq=128 causal",
    "memory b=128 L=4096 sq=1 hq=16", "memory b=128 L=8192 sq=1 hq=16",
    "memory b=128 L=16384 sq=1 hq=16", "memory b=128 L=4096 sq=1 hq=32",
    "memory b=128 L=8192 sq=1 hq=32", "memory b=128 L=16384 sq=1 hq=32",
    "memory b=128 L=8192 sq=1 hq=8",
    "batch b=1 L=1024 sq=1 hq=128", "batch b=8 L=1024 sq=1 hq=128",
    "batch b=512 L=1024 sq=1 hq=128", "batch b=1 L=55296 sq=1 hq=128",
    "batch b=512 L=2048 sq=1 hq=16",
    "imbalanced b=4 L=4641/45118/1730/1696 sq=4 hq=16 causal",
    "imbalanced b=8 L=32768+7x~500 sq=1 hq=128",
]


def test_serving_sweep_dry_run_lists_the_rows():
    res = run_bench("--sweep", "serving", "--dry-run", "--quick")
    assert res.returncode == 0, res.stderr
    assert table_names(res.stdout) == SWEEP_ROWS
    assert ("estimate: 34 rows (34 cases x 1 kernels; short 12, compute 8, memory 7, batch 5, "
            "imbalanced 2), 34 CUDA-graph captures") in res.stdout
    assert "eager loop of 20 calls per row and module" in res.stdout  # on with the sweep
    # --compare doubles the captures; the module is not imported by a dry run.
    res = run_bench("--sweep", "serving", "--dry-run", "--compare", "some_module_name",
                    "--kernel", "auto,sm90")
    assert res.returncode == 0, res.stderr
    assert "estimate: 68 rows" in res.stdout and "136 CUDA-graph captures" in res.stdout
    assert "compare: some_module_name" in res.stdout


def test_serving_sweep_with_only_no_defaults_and_case():
    res = run_bench("--sweep", "serving", "--only", "memory,imbalanced", "--dry-run")
    assert res.returncode == 0, res.stderr
    assert table_names(res.stdout) == [n for n in SWEEP_ROWS
                                       if n.startswith(("memory", "imbalanced"))]
    # --no-defaults drops the reference rows, not a sweep asked for by name; --case adds rows.
    res = run_bench("--sweep", "serving", "--only", "batch", "--no-defaults", "--dry-run",
                    "--case", "b=2,s_q=1,h_q=8,mean_L=100")
    assert res.returncode == 0, res.stderr
    assert table_names(res.stdout) == [n for n in SWEEP_ROWS if n.startswith("batch")] + [
        "custom b=2 L=100 sq=1 hq=8"]
    res = run_bench("--only", "short", "--dry-run")  # no reference row is short
    assert res.returncode == 2 and "no cases selected" in res.stderr
    res = run_bench("--sweep", "serving", "--only", "tiny", "--dry-run")
    assert res.returncode == 2 and "unknown kind" in res.stderr


def test_serving_sweep_rows(bench):
    cases = bench.serving_sweep(0)
    assert [c.name for c in cases] == SWEEP_ROWS
    by_name = {c.name: c for c in cases}
    assert [c.name for c in bench.serving_sweep(0)] == [c.name for c in cases]
    assert all(c.h_kv == 1 and min(c.lens) >= c.s_q for c in cases)
    assert all(c.causal for c in cases if c.s_q > 1)
    assert all(c.causal for c in cases if c.kind == "compute")
    # Lengths are the same as in any other run of the same case (seeded by the case).
    again = bench.serving_sweep(0, only=["memory"])
    assert all(c.lens == by_name[c.name].lens for c in again)
    assert bench.serving_sweep(1)[0].lens != cases[0].lens
    # The reference rows are in the sweep with their published figures.
    refs = {c.name: c.ref for c in bench.reference_cases(0)}
    for name, ref in refs.items():
        assert by_name[name].ref == ref and by_name[name].lens == \
            next(c.lens for c in bench.reference_cases(0) if c.name == name)
    assert sum(1 for c in cases if c.ref) == len(refs) == 7
    # The single requests have their length exactly; the eager rows are present.
    assert by_name["batch b=1 L=1024 sq=1 hq=128"].lens == [1024]
    assert by_name["batch b=1 L=55296 sq=1 hq=128"].lens == [55296]
    assert by_name["short b=32 L=1024 sq=1 hq=16"].b == 32
    imb = by_name["imbalanced b=8 L=32768+7x~500 sq=1 hq=128"]
    assert max(imb.lens) == 32768 and sorted(imb.lens)[-2] < 1024 and imb.b == 8
    # The normal(mean, mean / 2) draw lands near its mean for the big batches.
    big = by_name["batch b=512 L=2048 sq=1 hq=16"]
    assert abs(big.mean_L - 2048) < 0.1 * 2048


def test_capture_bound_and_bad_compare_path(tmp_path):
    res = run_bench("--sweep", "serving", "--compare", str(tmp_path / "ref.py"), "--dry-run")
    assert res.returncode == 2 and "no such file" in res.stderr
    (tmp_path / "ref.py").write_text("")
    res = run_bench("--sweep", "serving", "--compare", str(tmp_path / "ref.py"), "--dry-run",
                    "--max-captures", "60")
    assert res.returncode == 2 and "68 CUDA-graph captures" in res.stderr
    res = run_bench("--sweep", "serving", "--dry-run", "--eager-calls", "500")
    assert res.returncode == 2 and "--eager-calls" in res.stderr


def test_clock_label(bench):
    assert bench.clock_label(None) == "-"
    assert bench.clock_label({"sm_mhz_median": 1650.4, "power_capped_share": 0.9}) == "1650 cap"
    assert bench.clock_label({"sm_mhz_median": 1980, "power_capped_share": 0.2}) == "1980"


def test_report_shows_the_clock_column(bench):
    result = {"kernel": "auto", "kernel_name": "sm90", "ms": 0.55, "tflops": 545.0, "gbps": 2300.0,
              "sanity": {"ok": True},
              "clock": {"sm_mhz_median": 1612.5, "power_capped_share": 1.0}}
    bare = dict(result, clock=None)
    report = {"cases": [{"name": "with clock", "ref": None, "results": [result]},
                        {"name": "without clock", "spec_ref": None, "results": [bare]}],
              "ceilings": {"gemm": {"tflops": 696.0, "n": 8192, "ms": 1.58,
                                    "clock": {"sm_mhz_median": 1620, "power_capped_share": 0.3}}}}
    text = bench.format_report(report)
    assert "SM MHz" in text
    rows = {line.split("|")[0].strip(): line for line in text.splitlines() if "|" in line}
    assert "1612 cap" in rows["with clock"]
    assert rows["without clock"].split("|")[-2].strip() == "-"
    assert "SM MHz 1620)" in text  # the GEMM ceiling's clock, not capped in most samples
    assert "spec" not in text


def test_clock_sampler_without_nvidia_smi(bench, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no nvidia-smi to start
    sampler = bench.ClockSampler(0)
    try:
        assert sampler.window(0.0, float("inf")) is None
    finally:
        sampler.close()


def test_report_shows_the_burst_column_and_its_regime(bench):
    result = {"kernel": "auto", "kernel_name": "sm90", "ms": 0.55, "burst_ms": 0.495, "tflops": 545.0,
              "gbps": 2300.0, "sanity": {"ok": True}, "clock": None}
    report = {"cases": [{"name": "one", "ref": None, "results": [result]}], "ceilings": {},
              "settings": {"cool_s": 2.0}}
    text = bench.format_report(report)
    lines = [line for line in text.splitlines() if "|" in line]
    header = [c.strip() for c in lines[0].split("|")]
    row = [c.strip() for c in lines[1].split("|")]
    assert row[header.index("burst")] == "0.495 ms"
    assert row[header.index("time/call")] == "0.550 ms"
    assert "after 2 s idle" in text
    report["settings"] = {"cool_s": 0}
    assert "in the state the case before left" in bench.format_report(report)
    report["settings"] = {"cool_s": 0, "burst": False}
    assert "not measured (--quick)" in bench.format_report(report)


def test_cool_must_not_be_negative():
    res = run_bench("--dry-run", "--cool", "-1")
    assert res.returncode == 2 and "--cool" in res.stderr


# ----------------------------------------------------------------------------------------------
# --compare: loading the module
# ----------------------------------------------------------------------------------------------

FAKE_MODULE = '''
__version__ = "{version}"
MARK = "{mark}"


def get_mla_metadata(cache_seqlens, num_q_tokens_per_head_k, num_heads_k, seqlen_q=None):
    return ("meta", seqlen_q), None


def flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v,
                           tile_scheduler_metadata, num_splits, softmax_scale=None, causal=False):
    return q, None
'''


def write_fake(path, mark, version="9.9"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(FAKE_MODULE.format(mark=mark, version=version))
    return path


def test_compare_loads_a_py_file(bench, tmp_path):
    f = write_fake(tmp_path / "fake_ref_file.py", "file")
    module = bench.load_compare_module(str(f))
    assert module.MARK == "file" and bench.module_label(module) == "fake_ref_file 9.9"
    assert bench.takes_keyword(module.get_mla_metadata, "seqlen_q")
    assert not bench.takes_keyword(module.flash_mla_with_kvcache, "seqlen_q")


def test_compare_loads_a_module_name(bench, tmp_path, monkeypatch):
    write_fake(tmp_path / "fake_ref_by_name.py", "name")
    monkeypatch.syspath_prepend(str(tmp_path))
    module = bench.load_compare_module("fake_ref_by_name")
    assert module.MARK == "name"
    with pytest.raises(ModuleNotFoundError):
        bench.load_compare_module("no_such_module_for_the_benchmark")


def test_compare_loads_a_package_directory(bench, tmp_path):
    pkg = tmp_path / "refs" / "fake_ref_pkg"
    write_fake(pkg / "impl.py", "package")
    (pkg / "__init__.py").write_text(
        "from fake_ref_pkg.impl import get_mla_metadata, flash_mla_with_kvcache, MARK\n")
    module = bench.load_compare_module(str(pkg) + "/")
    assert module.MARK == "package" and module.__name__ == "fake_ref_pkg"
    with pytest.raises(ValueError, match="without __init__.py"):
        bench.load_compare_module(str(tmp_path / "refs"))


def test_compare_package_named_like_a_loaded_module(bench, tmp_path, monkeypatch):
    """A compared build named like this library (FlashMLA is also flash_mla) is imported apart:
    the module already loaded under that name stays in sys.modules, and the compared one keeps
    its own submodules."""
    name = "fake_collide_pkg"
    for where, mark in (("ours", "ours"), ("theirs", "theirs")):
        pkg = tmp_path / where / name
        write_fake(pkg / "impl.py", mark)
        (pkg / "__init__.py").write_text(
            f"from {name}.impl import get_mla_metadata, flash_mla_with_kvcache, MARK\n")
    monkeypatch.syspath_prepend(str(tmp_path / "ours"))
    ours = importlib.import_module(name)
    try:
        theirs = bench.load_compare_module(str(tmp_path / "theirs" / name))
        assert ours.MARK == "ours" and theirs.MARK == "theirs"
        assert sys.modules[name] is ours and sys.modules[name + ".impl"].MARK == "ours"
        assert theirs.flash_mla_with_kvcache("q", *[None] * 6)[0] == "q"
    finally:
        for k in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[k]


def test_compare_rejects_a_module_without_the_api(bench, tmp_path):
    f = tmp_path / "not_flash_mla.py"
    f.write_text("def get_mla_metadata(*a):\n    return None, None\n")
    with pytest.raises(ValueError, match="flash_mla_with_kvcache"):
        bench.load_compare_module(str(f))
    (tmp_path / "data.txt").write_text("")
    with pytest.raises(ValueError, match="neither a .py file"):
        bench.load_compare_module(str(tmp_path / "data.txt"))


def test_takes_keyword(bench):
    def seed(cache_seqlens, num_q_tokens_per_head_k, num_heads_k):
        pass

    def kwargs_only(*args, **kwargs):
        pass

    def keyword_only(a, *, seqlen_q=1):
        pass

    assert not bench.takes_keyword(seed, "seqlen_q")
    assert not bench.takes_keyword(kwargs_only, "seqlen_q")  # **kwargs is not a named seqlen_q
    assert bench.takes_keyword(keyword_only, "seqlen_q")
    bench.takes_keyword(len, "seqlen_q")  # builtins without a signature: no exception


# ----------------------------------------------------------------------------------------------
# Summaries and the chart
# ----------------------------------------------------------------------------------------------

def synthetic_report(with_eager=True):
    rows = [  # name, kind, nominal mean L, ratio, eager ratio
        ("short b=128 L=128", "short", 128, 1.25, 1.5),
        ("short b=128 L=1024", "short", 1024, 1.10, 1.2),
        ("compute b=128 L=8192", "compute", 8192, 0.95, 1.0),
        ("memory b=128 L=4096", "memory", 4096, 1.02, 1.1),
        ("imbalanced b=8", "imbalanced", None, 0.80, 0.9),
    ]
    cases = []
    for name, kind, L, r, er in rows:
        ours_ms = 0.1
        cmp = {"module": "ref 1.0", "ms": ours_ms * r, "ratio": r,
               "agreement": {"ok": name != "memory b=128 L=4096",
                             "problems": ["out max diff 3.00e-01 > 2.00e-03"]}}
        res = {"kernel": "auto", "ms": ours_ms, "tflops": 100.0, "gbps": 1000.0,
               "sanity": {"ok": True}, "compare": cmp}
        if with_eager:
            res["eager"] = {"wall_us": 50.0, "host_us": 20.0}
            cmp["eager"] = {"wall_us": 50.0 * er, "host_us": 30.0}
            cmp["eager_ratio"], cmp["host_ratio"] = er, 1.5
        cases.append({"name": name, "kind": kind, "target_mean_L": L,
                      "nominal_mean_L": L if L else 4534.5, "mean_L": L or 4534.5,
                      "results": [res]})
    cases.append({"name": "theirs failed", "kind": "batch", "target_mean_L": 1024,
                  "nominal_mean_L": 1024, "mean_L": 1000.0,
                  "results": [{"kernel": "auto", "ms": 0.2, "sanity": {"ok": True},
                               "compare": {"module": "ref 1.0", "error": "call: RuntimeError: "
                                           "unsupported h_q"}}]})
    return {"cases": cases, "kernels": ["auto"], "ceilings": {},
            "compare": {"label": "ref 1.0"},
            "env": {"gpu_name": "NVIDIA H200", "time_utc": "2025-01-02T03:04:05+00:00"}}


def test_geomean(bench):
    assert bench.geomean([]) is None
    assert bench.geomean([2.0, 8.0]) == pytest.approx(4.0)
    assert bench.geomean([4.0, None, 0.0, float("nan")]) == pytest.approx(4.0)


def test_ratio_summary_and_grouping(bench):
    report = synthetic_report()
    entries = bench.ratio_entries(report)
    assert [e["name"] for e in entries] == [c["name"] for c in report["cases"][:5]]
    s = bench.summarize_ratios(entries)
    assert s["n"] == 5 and s["n_at_least_1"] == 3
    assert s["geomean"] == pytest.approx(math.prod([1.25, 1.10, 0.95, 1.02, 0.80]) ** (1 / 5))
    assert s["n_short"] == 2 and s["geomean_short"] == pytest.approx(math.sqrt(1.25 * 1.10))
    assert s["min"] == 0.80 and s["min_row"] == "imbalanced b=8"
    assert list(s["by_kind"]) == ["short", "compute", "memory", "imbalanced"]
    assert s["by_kind"]["short"]["n"] == 2
    assert s["by_kind"]["short"]["geomean"] == pytest.approx(math.sqrt(1.25 * 1.10))
    assert s["by_kind"]["compute"]["n_at_least_1"] == 0

    summ = bench.compare_summary(report)
    assert summ["graph"]["n"] == 5 and summ["eager"]["n"] == 5
    assert summ["differ"] == ["memory b=128 L=4096"]
    assert summ["their_errors"] == ["theirs failed"]
    text = "\n".join(summ["lines"])
    assert "5 rows, 3 at >= 1.00x" in text and "min 0.80x (imbalanced b=8)" in text
    assert "mean L <= 1024: 1.17x (2 rows)" in text
    assert "eager wall time per call" in text
    assert "4 of 5 compared rows agree; DIFFER: memory b=128 L=4096" in text
    assert re.search(r"^  short\s+2 rows,\s+2 at >= 1.00x, geomean 1.17x", text, re.M), text

    # Several kernels: the kernel goes into the row's name.
    report["kernels"] = ["auto", "sm90"]
    report["cases"][0]["results"].append(dict(report["cases"][0]["results"][0], kernel="sm90"))
    names = [e["name"] for e in bench.ratio_entries(report)]
    assert "short b=128 L=128 [auto]" in names and "short b=128 L=128 [sm90]" in names


def test_report_with_compare_and_eager_columns(bench):
    report = synthetic_report()
    report["compare_summary"] = bench.compare_summary(report)
    text = bench.format_report(report)
    lines = [line for line in text.splitlines() if "|" in line]
    header = [c.strip() for c in lines[0].split("|")]
    assert header[-4:] == ["theirs", "ratio", "agree", "check"]
    first = [c.strip() for c in lines[1].split("|")]
    assert first[header.index("ratio")] == "1.25x" and first[header.index("agree")] == "ok"
    assert first[header.index("theirs")] == "0.125 ms"
    assert any("DIFF out max diff" in line for line in lines)
    assert any("ERROR call: RuntimeError: unsupported h_q" in line for line in lines)
    assert "ours wall" in text and "theirs host" in text and "wall ratio" in text
    assert "4 of 5 compared rows agree" in text
    line = bench.summary_line(report)
    assert "vs ref 1.0: 3/5 rows >= 1.00x" in line and "1 disagree" in line
    # A failed agreement fails the row (exit status 1), theirs failing does not.
    pairs = bench.result_pairs(report)
    assert [bench.row_failed(r) for _, r in pairs] == [False, False, False, True, False, False]


def test_png_of_the_ratios(bench, tmp_path):
    pytest.importorskip("matplotlib")
    report = synthetic_report()
    path = tmp_path / "out" / "ratio.png"
    msg = bench.write_png(report, str(path))
    assert "wrote" in msg and "10 bars" in msg
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    msg = bench.write_png(synthetic_report(with_eager=False), str(tmp_path / "graph_only.png"))
    assert "5 bars" in msg
    empty = {"cases": [], "kernels": ["auto"]}
    assert "no ratios" in bench.write_png(empty, str(tmp_path / "none.png"))
    assert not (tmp_path / "none.png").exists()


def test_png_without_matplotlib(bench, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    msg = bench.write_png(synthetic_report(), str(tmp_path / "x.png"))
    assert "matplotlib not importable" in msg and not (tmp_path / "x.png").exists()


# ----------------------------------------------------------------------------------------------
# --page-size and --page-sizes
# ----------------------------------------------------------------------------------------------

REFERENCE_ROWS = ["compute b=128 L=8192 sq=1 hq=128 causal", "compute b=128 L=32768 sq=1 hq=128 causal",
                  "compute b=128 L=8192 sq=2 hq=128 causal", "compute b=128 L=32768 sq=2 hq=128 causal",
                  "memory b=128 L=8192 sq=1 hq=16", "memory b=128 L=16384 sq=1 hq=32",
                  "imbalanced b=4 L=4641/45118/1730/1696 sq=4 hq=16 causal"]


@pytest.mark.parametrize("page", [16, 32, 128, 256])
def test_dry_run_page_size(page):
    """--page-size N: the same rows, the same lengths, named '... page=N'; the capture count
    does not change; with --compare the compared module gets a 64-token-page copy."""
    base = run_bench("--dry-run")
    res = run_bench("--dry-run", "--page-size", str(page))
    assert res.returncode == 0, res.stderr
    assert table_names(res.stdout) == [f"{n} page={page}" for n in REFERENCE_ROWS]
    assert f"page size {page}" in res.stdout.splitlines()[0]
    lengths = [line.split(": ", 1)[1] for line in res.stdout.splitlines() if line.startswith("lengths[")]
    assert lengths == [line.split(": ", 1)[1] for line in base.stdout.splitlines() if line.startswith("lengths[")]
    assert "estimate: 7 rows" in res.stdout and "7 CUDA-graph captures" in res.stdout
    res = run_bench("--dry-run", "--page-size", str(page), "--compare", "some_module_name")
    assert res.returncode == 0, res.stderr
    assert "given a copy of each cache in 64-token pages" in res.stdout
    assert "14 CUDA-graph captures" in res.stdout


def test_dry_run_page_size_64_is_the_default():
    base = run_bench("--dry-run")
    res = run_bench("--dry-run", "--page-size", "64")
    assert res.returncode == 0, res.stderr
    assert res.stdout == base.stdout
    assert "page=" not in res.stdout and "page size 64" in res.stdout
    res = run_bench("--dry-run", "--compare", "some_module_name")
    assert "64-token pages" not in res.stdout


@pytest.mark.parametrize("value", ["48", "0", "512", "1", "sixteen"])
def test_page_size_refuses_other_sizes(value):
    res = run_bench("--dry-run", "--page-size", value)
    assert res.returncode == 2 and "--page-size" in res.stderr, res.stderr


def test_page_size_in_case_json(bench):
    args = bench.parse_args(["--dry-run", "--page-size", "32", "--no-defaults", "--case",
                             "b=2,s_q=1,h_q=8,mean_L=100"])
    (case,) = args.cases
    assert case.page == 32 and case.name == "custom b=2 L=100 sq=1 hq=8 page=32"
    assert case.describe()["page_block_size"] == 32
    (case,) = bench.parse_args(["--dry-run", "--no-defaults", "--case", "b=2,s_q=1,h_q=8,mean_L=100"]).cases
    assert case.page == 64 and "page_block_size" not in case.describe()


def test_dry_run_page_sizes():
    """--page-sizes: the rows unchanged, one capture per page size per row and kernel."""
    res = run_bench("--dry-run", "--page-sizes", "16,32,64,128,256")
    assert res.returncode == 0, res.stderr
    assert table_names(res.stdout) == REFERENCE_ROWS
    assert "page sizes: 16, 32, 64, 128, 256, timed interleaved, reported as t(64) / t(page)" in res.stdout
    assert "estimate: 7 rows" in res.stdout and "35 CUDA-graph captures" in res.stdout
    # 64 (the baseline) is added; the sweep's eager loop is off in this mode.
    res = run_bench("--dry-run", "--page-sizes", "256,16", "--sweep", "serving", "--kernel", "auto,sm90",
                    "--max-captures", "300")
    assert res.returncode == 0, res.stderr
    assert "page sizes: 16, 64, 256," in res.stdout
    assert "204 CUDA-graph captures" in res.stdout  # 34 rows x 2 kernels x 3 page sizes
    assert "eager loop" not in res.stdout


@pytest.mark.parametrize("argv, message", [
    (["--page-sizes", "16,48"], "--page-sizes"),
    (["--page-sizes", "16,x"], "--page-sizes"),
    (["--page-sizes", ","], "--page-sizes"),
    (["--page-sizes", "16,16"], "named twice"),
    (["--page-sizes", "16,64", "--compare", "some_module_name"], "--compare"),
    (["--page-sizes", "16,64", "--page-size", "32"], "--page-size"),
    (["--page-sizes", "16,64", "--eager"], "--eager"),
    (["--page-sizes", "16,32,64,128,256", "--sweep", "serving", "--max-captures", "100"],
     "170 CUDA-graph captures"),
])
def test_page_sizes_usage_errors(argv, message):
    res = run_bench("--dry-run", *argv)
    assert res.returncode == 2 and message in res.stderr, res.stderr


def test_page_sizes_parsed(bench):
    args = bench.parse_args(["--page-sizes", "128,16", "--sweep", "serving"])
    assert args.page_size_list == [16, 64, 128] and args.eager is False and args.page_size == 64
    assert bench.capture_count(args) == 34 * 3
    args = bench.parse_args([])
    assert args.page_size_list is None and args.page_size == 64 and bench.capture_count(args) == 7


def test_help_mentions_the_page_options():
    res = run_bench("--help")
    assert res.returncode == 0
    text = " ".join(res.stdout.split())
    assert "--page-size N" in text and "--page-sizes N,N,..." in text
    assert "64-token pages" in text  # what --compare gets


# ----------------------------------------------------------------------------------------------
# --kv-dtype, --fp8-q and --kv-dtypes
# ----------------------------------------------------------------------------------------------


def _mb_column(stdout, column="MB"):
    """The dry run's values of a column, by row name."""
    lines = stdout.splitlines()
    header = [c.strip() for c in lines[1].split("|")]
    index = header.index(column)
    return {name: float(line.split("|")[index]) for name, line in
            zip(table_names(stdout), lines[3:]) if "|" in line}


@pytest.mark.parametrize("fp8_q", [False, True], ids=["q_bf16", "q_fp8"])
def test_dry_run_kv_dtype_fp8(fp8_q):
    """--kv-dtype fp8: the same rows and lengths, named '... kv=fp8' ('q=fp8' with --fp8-q),
    their bytes with 1-byte cache elements: about half the 16-bit ones where the cache
    dominates; the capture count does not change."""
    base = run_bench("--dry-run")
    res = run_bench("--dry-run", "--kv-dtype", "fp8", *(["--fp8-q"] if fp8_q else []))
    assert res.returncode == 0, res.stderr
    suffix = " kv=fp8" + (" q=fp8" if fp8_q else "")
    assert table_names(res.stdout) == [n + suffix for n in REFERENCE_ROWS]
    assert "KV cache fp8" in res.stdout.splitlines()[0]
    assert ("q fp8" in res.stdout.splitlines()[0]) == fp8_q
    assert "ref (H200)" in res.stdout and "630 TFLOP/s" not in res.stdout  # 16-bit figures dropped
    mb16, mb8 = _mb_column(base.stdout), _mb_column(res.stdout)
    for name in REFERENCE_ROWS:
        assert 0.49 < mb8[name + suffix] / mb16[name] < 0.53, name
    assert "estimate: 7 rows" in res.stdout and "7 CUDA-graph captures" in res.stdout


def test_fp8_bytes_formula(bench):
    """bytes = b * (mean_L * h_kv * d * kv + s_q * h_q * (d * qb + dv * 2))."""
    case = bench.Case("custom", None, 2, 8, 2, lens=[100, 300])
    assert case.bytes == (400 * 2 * 576 * 2 + 2 * 2 * 8 * (576 * 2 + 512 * 2))
    assert case.bytes_for(1, 2) == (400 * 2 * 576 + 2 * 2 * 8 * (576 * 2 + 512 * 2))
    assert case.bytes_for(1, 1) == (400 * 2 * 576 + 2 * 2 * 8 * (576 + 512 * 2))
    case.set_fp8(fp8_q=True)
    assert case.bytes == case.bytes_for(1, 1) and case.name.endswith(" kv=fp8 q=fp8")


def test_dry_run_kv_dtypes():
    """--kv-dtypes: the rows unchanged (16-bit figures in MB, the FP8 ones in 'MB fp8'), one
    capture per dtype per row and kernel; --dtype is the baseline."""
    res = run_bench("--dry-run", "--kv-dtypes", "fp8")
    assert res.returncode == 0, res.stderr
    assert table_names(res.stdout) == REFERENCE_ROWS
    assert "KV dtypes: bf16, fp8, timed interleaved, reported as t(bf16) / t(fp8)" in res.stdout
    assert "estimate: 7 rows" in res.stdout and "14 CUDA-graph captures" in res.stdout
    mb16, mb8 = _mb_column(res.stdout), _mb_column(res.stdout, "MB fp8")
    assert all(0.49 < mb8[n] / mb16[n] < 0.53 for n in REFERENCE_ROWS)
    res = run_bench("--dry-run", "--kv-dtypes", "fp16,fp8", "--dtype", "fp16", "--fp8-q", "--sweep", "serving")
    assert res.returncode == 0, res.stderr
    assert "KV dtypes: fp16, fp8 (q fp8 with fp8)" in res.stdout
    assert "68 CUDA-graph captures" in res.stdout and "eager loop" not in res.stdout


@pytest.mark.parametrize("argv, message", [
    (["--kv-dtype", "fp16"], "--kv-dtype fp16 with --dtype bf16"),
    (["--kv-dtype", "int8"], "--kv-dtype"),
    (["--kv-dtype", "fp8", "--compare", "some_module_name"], "--compare"),
    (["--fp8-q"], "--fp8-q needs an FP8 cache"),
    (["--kv-dtypes", "bf16,fp16"], "--kv-dtypes"),
    (["--kv-dtypes", "fp8,fp8"], "named twice"),
    (["--kv-dtypes", ","], "--kv-dtypes"),
    (["--kv-dtypes", "fp8", "--compare", "some_module_name"], "--compare"),
    (["--kv-dtypes", "fp8", "--page-sizes", "16"], "--page-sizes"),
    (["--kv-dtypes", "fp8", "--kv-dtype", "fp8"], "--kv-dtype"),
    (["--kv-dtypes", "fp8", "--eager"], "--eager"),
    (["--kv-dtypes", "fp8", "--sweep", "serving", "--max-captures", "60"], "68 CUDA-graph captures"),
])
def test_kv_dtype_usage_errors(argv, message):
    res = run_bench("--dry-run", *argv)
    assert res.returncode == 2 and message in res.stderr, res.stderr


def test_kv_dtypes_parsed(bench):
    args = bench.parse_args(["--kv-dtypes", "fp8,bf16", "--sweep", "serving"])
    assert args.kv_dtype_list == ["bf16", "fp8"] and args.kv_dtype == "bf16" and args.eager is False
    assert bench.capture_count(args) == 34 * 2 and not args.fp8_q
    args = bench.parse_args(["--kv-dtype", "fp8", "--fp8-q", "--page-sizes", "16"])
    assert args.kv_dtype == "fp8" and args.fp8_q and args.kv_dtype_list is None
    assert all(c.kv_dtype == "fp8" and c.fp8_q for c in args.cases)
    assert bench.capture_count(args) == 7 * 2
    args = bench.parse_args([])
    assert args.kv_dtype == "bf16" and args.kv_dtype_list is None and not args.fp8_q
    assert all(c.kv_dtype is None for c in args.cases)


def test_help_mentions_the_kv_dtype_options():
    res = run_bench("--help")
    assert res.returncode == 0
    text = " ".join(res.stdout.split())
    assert "--kv-dtype {bf16,fp16,fp8}" in text and "--fp8-q" in text and "--kv-dtypes D,D,..." in text
