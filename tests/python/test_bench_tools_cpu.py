"""The benchmark CLI's GPU-free parts: case listing, report formatting (with and without the
SM-clock column's data) and the nvidia-smi clock sampler where nvidia-smi is missing."""

import importlib.util
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks" / "bench_decode.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_decode_under_test", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_lists_the_spec_cases():
    res = subprocess.run([sys.executable, str(BENCH), "--dry-run"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    for name in ("compute b=128 L=8192 sq=1 hq=128 causal", "memory b=128 L=16384 sq=1 hq=32",
                 "imbalanced b=4 L=4641/45118/1730/1696 sq=4 hq=16 causal"):
        assert name in res.stdout, res.stdout


def test_clock_label(bench):
    assert bench.clock_label(None) == "-"
    assert bench.clock_label({"sm_mhz_median": 1650.4, "power_capped_share": 0.9}) == "1650 cap"
    assert bench.clock_label({"sm_mhz_median": 1980, "power_capped_share": 0.2}) == "1980"


def test_report_shows_the_clock_column(bench):
    result = {"kernel": "auto", "kernel_name": "sm90", "ms": 0.55, "tflops": 545.0, "gbps": 2300.0,
              "sanity": {"ok": True},
              "clock": {"sm_mhz_median": 1612.5, "power_capped_share": 1.0}}
    bare = dict(result, clock=None)
    report = {"cases": [{"name": "with clock", "spec_ref": None, "results": [result]},
                        {"name": "without clock", "spec_ref": None, "results": [bare]}],
              "ceilings": {"gemm": {"tflops": 696.0, "n": 8192, "ms": 1.58,
                                    "clock": {"sm_mhz_median": 1620, "power_capped_share": 0.3}}}}
    text = bench.format_report(report)
    assert "SM MHz" in text
    rows = {line.split("|")[0].strip(): line for line in text.splitlines() if "|" in line}
    assert "1612 cap" in rows["with clock"]
    assert rows["without clock"].split("|")[-2].strip() == "-"
    assert "SM MHz 1620)" in text  # the GEMM ceiling's clock, not capped in most samples


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
    report = {"cases": [{"name": "one", "spec_ref": None, "results": [result]}], "ceilings": {},
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


def test_cool_must_not_be_negative():
    res = subprocess.run([sys.executable, str(BENCH), "--dry-run", "--cool", "-1"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2 and "--cool" in res.stderr
