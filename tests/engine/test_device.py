"""The compute dtype `dtype = "auto"` picks on a CPU follows its flags, and the throughput benchmark picks the same
(issue 23, item 19: on an AVX2-only CPU it spent minutes measuring emulated bf16, then ran every peer in bf16)."""

import importlib.util
from pathlib import Path

import pytest
import torch

from xtune.engine import device

AVX2_ONLY = "flags\t\t: fpu vme sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 bmi1 bmi2\n"
"""/proc/cpuinfo of an AVX2-only CPU (a Haswell's flags, shortened): no AVX512, no AMX."""
CPUS = {
    "avx2 only": ({"avx", "avx2", "fma"}, torch.float32),
    "avx512 without bf16": ({"avx2", "avx512f", "avx512bw"}, torch.float32),
    "avx512_bf16": ({"avx2", "avx512f", "avx512_bf16"}, torch.bfloat16),
    "amx": ({"avx2", "avx512f", "amx_bf16", "amx_tile", "amx_int8"}, torch.bfloat16),
    "no /proc/cpuinfo": (set(), torch.float32),
}


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Intel(R) Core(TM) i7-4770 CPU @ 3.40GHz\n" + AVX2_ONLY)
    flags = device.cpu_flags(cpuinfo)
    assert {"avx2", "fma"} <= flags and not flags & {"avx512f", "avx512_bf16", "amx_bf16"}
    assert device.cpu_flags(tmp_path / "absent") == frozenset()


@pytest.mark.parametrize("flags, expected", CPUS.values(), ids=CPUS)
def test_auto_dtype_on_a_cpu_follows_its_flags(monkeypatch, flags, expected):
    monkeypatch.setattr(device, "cpu_flags", lambda: frozenset(flags))
    assert device.resolve_dtype("auto", torch.device("cpu")) == expected
    assert device.resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16  # a named dtype is kept


def throughput_benchmark():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "train_throughput.py"
    spec = importlib.util.spec_from_file_location("train_throughput", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("flags, expected", CPUS.values(), ids=CPUS)
def test_the_throughput_benchmark_computes_and_measures_its_peak_in_the_auto_dtype(monkeypatch, flags, expected):
    bench = throughput_benchmark()
    monkeypatch.setattr(device, "cpu_flags", lambda: frozenset(flags))
    measured = []

    def matmul_peak(threads, dtypes):
        measured.extend(dtypes)
        return {f"{name}_gflops": 10.0 for name in dtypes}

    monkeypatch.setattr(bench, "matmul_peak", matmul_peak)
    compute = bench.compute_dtype("cpu")
    assert device.DTYPES[compute] == expected
    peak = bench.peak_both(2, "cpu", compute)
    assert f"{compute}_gflops" in peak  # the MFU's denominator
    assert ("bf16" in measured) == (compute == "bf16")  # emulated bf16 is never timed: minutes on an AVX2-only CPU
    assert bench.compute_dtype("cpu", "bf16") == "bf16"  # --dtype still names one


def test_the_throughput_report_names_the_cpu_its_flags_and_the_dtype():
    bench = throughput_benchmark()
    report = {
        "date": "2026-12-02", "command": "python benchmarks/train_throughput.py", "load_before": 1.0, "load_after": 1.0,
        "machine": "x86_64, 4 cores, Intel(R) Core(TM) i7-4770 CPU @ 3.40GHz", "dtype": "fp32",
        "cpu": {"model": "Intel(R) Core(TM) i7-4770 CPU @ 3.40GHz", "flags": ["avx2"]},
        "args": {"model": "28m", "device": "cpu", "threads": 1, "dtype": "auto", "peers": ["xtune_packed"], "repeats": 1},
        "plan": {"samples": 3, "tokens": 300, "trained_tokens": 100, "min_length": 50, "max_length": 150,
                 "median_length": 100, "packed_rows": 1, "packing_efficiency": 0.15, "unpacked_batch_size": 3},
        "peak": {"fp32_gflops": 71.0, "fp32_gflops_2_threads": 130.0},
        "summary": {"by_peer": {}, "ratios": {}}, "loss_check": {"checked": False},
    }  # fmt: skip
    text = bench.markdown(report)
    assert "(28m model, CPU, fp32)" in text
    assert "i7-4770" in text and "CPU flags avx2 (no avx512f, avx512_bf16, amx_bf16, amx_tile, amx_int8)" in text
    assert "compute dtype fp32 (what dtype = 'auto' picks here); fp32 matmul peak on 1 thread(s) 71 GFLOP/s" in text
    assert "on 2 threads 130" in text and "bf16 matmul" not in text
