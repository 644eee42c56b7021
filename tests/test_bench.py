"""The benchmark tool at toy sizes: the FLOP counter is exact, engines are timed round-robin,
and `faceedit bench` prints its table and writes JSON with every figure. No timing
assertions: the figures themselves are for BENCHMARKS.md, measured on purpose."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from bench.models import FlopCount, count_flops, tiny_cases
from bench.roofline import machine_info, measure_roofline
from bench.run import Schedule, polyphase_weight, round_robin
from faceedit.cli import main


def test_flop_counter_counts_each_kind_exactly():
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),                    # dense: 8*8 px * 8 out * 3 in * 9
        nn.Conv2d(8, 8, 3, padding=1, groups=8),          # depthwise: 8*8 px * 8 * 1 * 9
        nn.ConvTranspose2d(8, 4, 3, stride=2),            # transposed: 8*8 input px * 8 * 4 * 9
        nn.Flatten(),
        nn.Linear(4 * 17 * 17, 10),                       # matmul: 1156 * 10
    )
    count = count_flops(net, {"x": torch.zeros(1, 3, 8, 8)})
    assert count == FlopCount(dense_conv_macs=64 * 8 * 3 * 9, transposed_conv_macs=64 * 8 * 4 * 9,
                              grouped_conv_macs=64 * 8 * 9, matmul_macs=4 * 17 * 17 * 10)
    assert count.flops == 2 * count.macs
    # batch scales every kind, and nothing was computed on the real module's device
    assert count_flops(net, {"x": torch.zeros(3, 3, 8, 8)}) == count.scaled(3)
    assert next(net.parameters()).device.type == "cpu"


def test_synthesis_flops_separate_the_fir_blur_from_the_convolutions():
    case = tiny_cases()["synthesis_tiny"]
    count = case.flops_per_image(case.build(0))
    # upfirdn2d's blur and zero insertion are depthwise: counted, but not as GEMM work
    assert min(count.dense_conv_macs, count.transposed_conv_macs, count.grouped_conv_macs, count.matmul_macs) > 0
    assert 0.5 < count.gemm_share < 1.0


def test_round_robin_alternates_engines_and_respects_the_schedule():
    order = []
    calls = {name: (lambda name=name: order.append(name)) for name in ("a", "b", "c")}
    timings = round_robin(calls, Schedule(warmup=1, repeats=3, min_repeats=3, max_seconds=1e9))
    assert order == ["a", "b", "c"] * 4              # one warm-up round, three timed rounds, interleaved
    assert all(len(t.samples_s) == 3 for t in timings.values())
    order.clear()
    # an exhausted time budget stops after min_repeats rounds
    timings = round_robin(calls, Schedule(warmup=0, repeats=10, min_repeats=2, max_seconds=1e-9))
    assert order == ["a", "b", "c"] * 2 and len(timings["a"].samples_s) == 2


def test_polyphase_rewrite_of_the_upsampling_conv_is_exact():
    # the rewrite the upsample study times: Conv(2x2, pads 1) to 4*C_out + depth-to-space (CRD,
    # which is torch's pixel_shuffle order) equals the stride-2 transposed 3x3 conv
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(5, 3, 3, 3, generator=gen)
    x = torch.randn(2, 5, 6, 7, generator=gen)
    expected = torch.nn.functional.conv_transpose2d(x, weight, stride=2)
    conv = torch.nn.functional.conv2d(x, torch.from_numpy(polyphase_weight(weight.numpy())), padding=1)
    got = torch.nn.functional.pixel_shuffle(conv, 2)[:, :, :13, :15]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_roofline_and_machine_info_report_what_they_measured():
    info = machine_info()
    assert info.cpu_model and info.logical_cpus >= 1 and len(info.load_average) == 3
    roofline = measure_roofline(threads=1, size=64, repeats=1)
    assert [r.library for r in roofline.results] == ["torch", "numpy", "onnxruntime"]
    assert all(r.gflops > 0 and r.size == 64 and r.threads == 1 for r in roofline.results)
    assert roofline.peak_gflops == max(r.gflops for r in roofline.results)
    with pytest.raises(ValueError, match="unknown libraries"):
        measure_roofline(threads=1, size=64, repeats=1, libraries=("blas9000",))


def test_bench_verb_prints_the_table_and_writes_json(tmp_path, pytestconfig, capsys):
    # the toy synthesis export is kept in pytest's cache: later runs skip the export
    work = pytestconfig.cache.mkdir("faceedit-bench-work")
    out = tmp_path / "bench.json"
    code = main(["bench", "--models", "synthesis_tiny", "--batches", "1", "2", "--engines", "torch", "onnxruntime",
                 "--warmup", "0", "--repeats", "2", "--gemm-size", "64", "--gemm-repeats", "1",
                 "--work-dir", str(work), "--json", str(out), "--log-level", "WARNING"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "CPU " in printed and "threads: torch" in printed and "roofline peak" in printed
    assert "median ms" in printed and "% peak" in printed
    if not torch.cuda.is_available():
        assert "GPU column torch-cuda: not available" in printed and "NOT MEASURED" in printed
    assert "bars: not evaluated" in printed  # synthesis_1024 was not in this run

    data = json.loads(out.read_text())
    assert {"machine", "threads", "roofline", "gpu", "schedule", "cases", "bars", "weights"} <= set(data)
    assert data["complete"] is True
    assert data["roofline"]["peak_gflops"] > 0
    (case,) = data["cases"]
    assert case["name"] == "synthesis_tiny" and case["served_as"] == "synthesis"
    assert case["flops_per_image"]["flops"] > 0 and case["onnx_mb"] > 0
    assert {"torch", "onnxruntime"} <= set(case["engines"])
    rows = {(r["batch"], r["engine"]): r for r in case["rows"]}
    assert set(rows) == {(b, e) for b in (1, 2) for e in ("torch", "onnxruntime")}
    for (batch, engine), r in rows.items():
        assert len(r["samples_s"]) == 2 and r["median_s"] > 0 and r["p90_s"] >= min(r["samples_s"])
        assert r["images_per_s"] == pytest.approx(batch / r["median_s"])
        assert r["gflops"] == pytest.approx(case["flops_per_image"]["flops"] * batch / r["median_s"] / 1e9)
        assert r["pct_peak"] == pytest.approx(100 * r["gflops"] / data["roofline"]["peak_gflops"])
        if engine == "torch":
            assert r["speedup_vs_torch"] == pytest.approx(1.0) and r["max_abs_diff_vs_torch"] is None
        else:
            # the exported graph computes what PyTorch computes, at every batch size
            assert r["max_abs_diff_vs_torch"] < 1e-4
            assert np.isfinite(r["speedup_vs_torch"])
    # one line per (batch, engine), in the interim table after the case and in the final one
    table_lines = [line for line in printed.splitlines() if line.startswith("synthesis_tiny ")]
    assert len(table_lines) == 2 * 4


def test_gateway_overhead_times_gateway_in_process_and_direct_paths(tiny_set, tmp_path):
    """One round on the tiny set: the three paths ran the same request (no timing asserted)."""
    from bench import gateway_overhead

    out = tmp_path / "gw.json"
    code = gateway_overhead.main(["--model-set", str(tiny_set), "--rounds", "1", "--warmup", "1",
                                  "--intra-op-threads", "1", "--json", str(out)])
    assert code == 0
    doc = json.loads(out.read_text())
    assert [r["scenario"] for r in doc["results"]] == ["photo", "latent"]
    for r in doc["results"]:
        assert r["model_calls"] and r["model_calls"][-1]["model"] in ("synthesis", "parser")
        for path in ("gateway", "direct", "in_process"):
            assert len(r[f"{path}_samples_s"]) == 1 and r[f"{path}_median_s"] > 0
        assert r["overhead_s"] == pytest.approx(r["serving_overhead_s"] + r["image_stages_s"])
    photo = doc["results"][0]
    assert {"decode", "align", "invert", "synthesize", "encode"} <= set(photo["stage_median_s"])
