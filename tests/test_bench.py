"""The benchmark harness: the physical baseline, a CLI command timed as a fresh process, and a
whole (tiny) benchmark run with its report rows."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from lib_ortholora import benchmarks
from lib_ortholora.benchmarks._baseline import baseline, drop_cache, read_once, write_once
from lib_ortholora.benchmarks._process import run_command
from lib_ortholora.cli.bench import as_report


def test_benchmark_names_are_the_public_modules() -> None:
    assert {"extract", "merge"} <= set(benchmarks.NAMES)
    assert not any(n.startswith("_") for n in benchmarks.NAMES)


def test_baseline_reads_and_writes_what_it_says(tmp_path: Path) -> None:
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(os.urandom(3 << 20))
    b.write_bytes(b"x" * 1000)
    assert drop_cache([a, b]) == hasattr(os, "posix_fadvise")
    assert read_once([a, b]) > 0
    assert write_once(tmp_path / "w.bin", 5 << 20) > 0 and not (tmp_path / "w.bin").exists()
    figures = baseline([str(a), str(b)], 2 << 20, tmp_path)
    assert figures["input_mb"] == pytest.approx(3.0, abs=0.01) and figures["output_mb"] == 2.0
    assert figures["warm_s"] == pytest.approx(figures["read_warm_s"] + figures["write_s"], abs=2e-3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.bin"]  # the written file is gone


def test_a_command_is_timed_as_its_own_process(tmp_path: Path) -> None:
    ok = run_command(["--help"], tmp_path)
    assert "error" not in ok and ok["wall_s"] > 0 and ok["user_s"] > 0 and ok["minor_faults"] > 0
    assert 10 < ok["peak_rss_mb"] < 4000  # the child's own VmHWM, written as it exits
    bad = run_command(["extract", "nope.safetensors", "nope2.safetensors", "-o", "x.safetensors"], tmp_path)
    assert bad["error"].startswith("exit 2:") and "nope.safetensors" in bad["error"]


@pytest.fixture(scope="module")
def small_extract(tmp_path_factory) -> dict:
    return benchmarks.run("extract", "sd15", tmp_path_factory.mktemp("bench"), full=False)


def test_a_small_benchmark_runs_cold_warm_and_in_process_beside_its_baseline(small_extract: dict) -> None:
    f = small_extract
    runs = [f["cli_warm"], f["in_process"]["op"]] + ([f["cli_cold"]] if hasattr(os, "posix_fadvise") else [])
    for run in runs:
        assert "error" not in run
        assert {"wall_s", "user_s", "sys_s", "minor_faults", "peak_rss_mb", "load_before", "load_after"} <= set(run)
    assert f["command"].startswith("python -m lib_ortholora extract ") and "--rank 32" in f["command"]
    assert f["baseline"]["input_mb"] > 10 and f["baseline"]["output_mb"] > 1
    assert f["in_process"]["modules"] == 264 and f["in_process"]["sampled_layers"] == 12
    if f["baseline"]["warm_s"] > 0:
        assert f["cli_warm"]["x_baseline"] == pytest.approx(f["cli_warm"]["wall_s"] / f["baseline"]["warm_s"], rel=0.01)


def test_the_bench_report_has_a_row_per_run_and_the_rest_as_totals(small_extract: dict) -> None:
    report = as_report(small_extract, "extract sd15")
    modules = [r.module for r in report.rows]
    assert modules[:3] == ["read the inputs once, cold", "read the inputs once, warm",
                           "write the output's size once (+fsync)"] or not hasattr(os, "posix_fadvise")
    assert modules[-2:] == ["extract sd15: CLI process, warm page cache", "extract sd15: in-process"]
    assert "x_baseline" in report.columns() and "minor_faults" in report.columns()
    assert {"error_vs_exact_max_ratio", "baseline_warm_s", "command"} <= set(report.totals)
    assert "wall_s" not in report.totals and "op" not in report.totals


def test_a_benchmark_of_timed_parts_gets_no_in_process_row_of_its_wrapper() -> None:
    """resize and batch time their parts (cold, warm, first_file, …) in children: the wrapper's own
    wall/CPU figures (mostly waiting) must not appear as an "in-process" row."""
    part = {"wall_s": 6.2, "user_s": 8.7, "sys_s": 1.5, "peak_rss_mb": 506.0}
    figures = {"in_process": {"wall_s": 143.3, "user_s": 0.94, "sys_s": 3.8, "warm": part, "cold": dict(part),
                              "modules": 986}}
    report = as_report(figures, "resize sdxl")
    assert [r.module for r in report.rows] == ["resize sdxl: warm", "resize sdxl: cold"]
    assert report.totals["in_process_total_s"] == 143.3 and report.totals["modules"] == 986
    assert "user_s" not in report.totals


@pytest.mark.slow
def test_small_batch_benchmark_reports_flatness_and_linearity(tmp_path: Path) -> None:
    from lib_ortholora.benchmarks import batch
    f = benchmarks.run("batch", "sd15", tmp_path, full=False)
    inside = f["in_process"]
    assert "error" not in f["cli_warm"] and f["command"].count(".safetensors") == batch.BATCH
    assert f["baseline"]["output_mb"] > 0  # the outputs of the whole batch, written as one file
    for key in ("first_file", f"first_{batch.FIRST}", "all"):
        assert "error" not in inside[key] and inside[key]["per_file_s"] > 0
    assert inside["all"]["outputs"] == batch.BATCH and inside["first_file"]["outputs"] == 1
    assert inside["rss_growth_mb"] == pytest.approx(inside["all"]["peak_rss_mb"] - inside["first_file"]["peak_rss_mb"],
                                                    abs=0.11)
    assert inside["time_ratio_linear"] == batch.BATCH / batch.FIRST and inside["time_ratio_all_vs_first"] > 0
