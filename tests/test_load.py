"""bench/load.py, short and bounded, against a real gateway on loopback: the report's
structure, and backpressure: past the per-replica limit calls are refused with
RESOURCE_EXHAUSTED at once (p99 of the refusals < 100 ms), never left to time out.

The gateway's backend is the scripted test backend (a fixed 30 ms per model call), so the
figures depend on the gateway and not on how busy this machine's CPUs are with networks;
bench/load.py itself runs the embedded and Triton backends (RELIABILITY.md).
"""
from __future__ import annotations

import asyncio
import json
import time

import pytest

from bench.load import LevelReport, LoadConfig, check_loopback, main, run_load
from services.gateway.config import GatewayConfig
from test_gateway_server import ScriptedBackend, ServerThread, metric_value, model_set  # noqa: F401

LIMIT = 2
DELAY = 0.03


@pytest.fixture(scope="module")
def gateway(model_set, aligner):
    server = ServerThread(GatewayConfig(model_set=model_set, max_concurrency=LIMIT, metrics_port=0),
                          ScriptedBackend(delay=DELAY), aligner)
    yield server
    server.stop()


def test_rising_concurrency_reports_and_backpressure(gateway):
    config = LoadConfig(requests=30, time_cap_s=10.0, call_timeout_s=5.0, backoff_s=0.02, warmup=1)
    before = metric_value(gateway.metrics_text(), "faceedit_rejected_total")
    start = time.monotonic()
    reports = asyncio.run(run_load(f"127.0.0.1:{gateway.port}", [1, LIMIT, 3 * LIMIT], config, "edit"))
    assert time.monotonic() - start < 20

    assert [r.concurrency for r in reports] == [1, LIMIT, 3 * LIMIT]
    for r in reports:
        assert isinstance(r, LevelReport) and r.sent == config.requests and sum(r.codes.values()) == r.sent
        assert r.duration_s > 0 and r.ok_per_s > 0
        assert r.ok_ms is not None and r.ok_ms.n == r.codes["OK"]
        assert r.ok_ms.p50 <= r.ok_ms.p95 <= r.ok_ms.p99 <= r.ok_ms.max
        assert r.ok_ms.p50 >= DELAY * 1000  # one backend call of DELAY per edit
        assert set(r.to_dict()) == {"concurrency", "sent", "duration_s", "codes", "ok_per_s", "ok_ms", "rejected_ms",
                                    "other_error_ms"}
        assert r.other_error_ms is None  # nothing but OK and RESOURCE_EXHAUSTED, and no timeout

    within, _, past = reports
    for r in reports[:2]:  # at or under the limit: every call served
        assert r.codes == {"OK": config.requests} and r.rejected_ms is None
    # past the limit: some calls refused, fast, and the admitted ones still served
    rejected = past.codes.get("RESOURCE_EXHAUSTED", 0)
    assert rejected > 0 and past.codes["OK"] > 0 and set(past.codes) == {"OK", "RESOURCE_EXHAUSTED"}
    assert past.rejected_ms.n == rejected and past.rejected_ms.p99 < 100.0
    assert past.rejected_ms.p50 < within.ok_ms.p50  # refused quicker than a call is served
    assert metric_value(gateway.metrics_text(), "faceedit_rejected_total") == before + rejected


def test_time_cap_bounds_a_level(gateway):
    config = LoadConfig(requests=10**6, time_cap_s=0.5, call_timeout_s=5.0, warmup=0)
    start = time.monotonic()
    (report,) = asyncio.run(run_load(f"127.0.0.1:{gateway.port}", [2], config, "generate"))
    assert time.monotonic() - start < 3.0
    # Generate = mapping + synthesis: two backend calls of DELAY each, two workers
    assert 0 < report.sent < 0.5 / (2 * DELAY) * 2 + 4
    assert report.codes == {"OK": report.sent}


def test_loopback_only():
    for target in ("127.0.0.1:50051", "localhost:1", "[::1]:50051"):
        check_loopback(target)
    for target in ("10.0.0.7:50051", "example.com:443", "0.0.0.0:50051", "gateway.faceedit.svc:50051"):
        with pytest.raises(ValueError, match="loopback only"):
            check_loopback(target)
    with pytest.raises(ValueError, match="loopback only"):
        asyncio.run(run_load("192.0.2.1:50051", [1], LoadConfig(requests=1), "edit"))


def test_command_line_writes_the_report(gateway, tmp_path, capsys):
    out = tmp_path / "load.json"
    assert main(["--target", f"127.0.0.1:{gateway.port}", "--concurrency", "1,4", "--requests", "12",
                 "--time-cap", "5", "--max-concurrency", str(LIMIT), "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [level["concurrency"] for level in data["levels"]] == [1, 4]
    assert all(level["sent"] == 12 for level in data["levels"])
    assert len(data["meta"]["load_average_before"]) == 3 and data["meta"]["workload"] == "edit"
    table = capsys.readouterr().out
    assert "RES_EXH" in table and "load average" in table
