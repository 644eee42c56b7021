"""Reproducible fault runs: a real gateway on a real Triton under steady load, while Triton is
killed and restarted, or frozen and thawed, cycle after cycle.

    python -m bench.faults --work-dir /tmp/faceedit-bench --cycles 6 --seed 0 --json faults.json

Faults (the schedule, outage lengths included, comes from --seed alone):
* kill: SIGKILL to Triton's whole process group (server and python-backend stubs), then a
  restart on the SAME ports after the outage. Expected: calls fail fast with UNAVAILABLE,
  gRPC health turns NOT_SERVING, and the gateway serves again by itself once Triton is back.
* freeze: SIGSTOP to the group (a hung backend: connections stay open, nothing answers),
  then SIGCONT. Expected: calls end with DEADLINE_EXCEEDED at their deadline (not later),
  health turns NOT_SERVING (the readiness check times out), and service resumes on thaw.

Measured per cycle, on the gateway's clock as a client sees it: detection (fault -> first
NOT_SERVING health answer), the status codes and latencies of calls during the outage, how
far past their deadline DEADLINE_EXCEEDED answers came, Triton's restart time, and
recovery (Triton ready again -> first successful call, -> first SERVING answer).

Loopback only; every wait is bounded (--recover-timeout).
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import logging
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.load import GatewayProcess, Percentiles, check_loopback, free_port, model_subset, tiny_model_set, \
    triton_repository, wait_serving
from faceedit.v1 import faceedit_pb2 as pb
from faceedit.v1 import faceedit_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

FAULTS = ("kill", "freeze")
# Generate needs only these two: a short Triton start, so a restart is quick to measure
FAULT_MODELS = ("mapping", "synthesis")
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVING = health_pb2.HealthCheckResponse.SERVING


@dataclass(frozen=True)
class FaultConfig:
    concurrency: int = 2            # closed-loop Generate callers during the whole cycle
    call_timeout_s: float = 2.0     # each call's deadline
    steady_s: float = 2.0           # load before the fault
    outage_s: tuple[float, float] = (2.0, 6.0)  # fault length, drawn uniformly from this range
    recover_timeout_s: float = 60.0  # after Triton is back, give up waiting for recovery
    health_poll_s: float = 0.05     # how often the client side asks the gateway's health
    max_calls: int = 100_000        # hard bound on calls per cycle

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.max_calls < 1:
            raise ValueError("FaultConfig.concurrency and max_calls must be >= 1")
        if not 0 < self.outage_s[0] <= self.outage_s[1]:
            raise ValueError(f"FaultConfig.outage_s must be (low, high) with 0 < low <= high, got {self.outage_s}")


@dataclass(frozen=True)
class CycleReport:
    fault: str
    outage_s: float
    detect_s: float | None            # fault -> first NOT_SERVING health answer
    outage_codes: dict[str, int]      # calls that started after the fault and ended before Triton was back
    outage_ms: Percentiles | None     # their latencies
    deadline_overshoot_ms: Percentiles | None  # DEADLINE_EXCEEDED latency minus the deadline
    restart_s: float | None           # kill: Triton start -> ready again
    recover_ok_s: float | None        # Triton back -> first OK call that started after it
    recover_serving_s: float | None   # Triton back -> first SERVING health answer
    codes: dict[str, int]             # every call of the cycle
    triton_exit: str | None = None    # Triton died after the fault was lifted: its exit code and log tail

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def signal_group(pid: int, sig: signal.Signals) -> None:
    """Send `sig` to the process group `pid` leads (Triton starts its own, with its stubs)."""
    os.killpg(os.getpgid(pid), sig)


class Recorder:
    """Steady Generate load and a health poller on the event loop, with timestamps."""

    def __init__(self, target: str, config: FaultConfig) -> None:
        check_loopback(target)
        self.target = target
        self.config = config
        self.calls: list[tuple[float, float, str]] = []    # (start, end, code), time.monotonic()
        self.health: list[tuple[float, int | None]] = []   # (time, status or None when unanswered)
        self._stop = asyncio.Event()
        self._seed = 0

    async def _caller(self, stub: pb_grpc.FaceEditorStub) -> None:
        while not self._stop.is_set() and len(self.calls) < self.config.max_calls:
            self._seed += 1
            start = time.monotonic()
            try:
                await stub.Generate(pb.GenerateRequest(seed=self._seed), timeout=self.config.call_timeout_s)
                code = "OK"
            except grpc.aio.AioRpcError as err:
                code = err.code().name
            end = time.monotonic()
            self.calls.append((start, end, code))
            if code != "OK":
                # a failing backend answers at once: pause a little, as a client would, so the
                # record is not millions of identical failures
                await asyncio.sleep(0.02)

    async def _poller(self, channel: grpc.aio.Channel) -> None:
        stub = health_pb2_grpc.HealthStub(channel)
        while not self._stop.is_set():
            try:
                status = (await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)).status
            except grpc.aio.AioRpcError:
                status = None
            self.health.append((time.monotonic(), status))
            await asyncio.sleep(self.config.health_poll_s)

    async def run(self, fault_coro) -> None:
        """Load and polling around `fault_coro` (which injects the fault and ends it)."""
        async with grpc.aio.insecure_channel(self.target) as channel:
            stub = pb_grpc.FaceEditorStub(channel)
            tasks = [asyncio.create_task(self._caller(stub)) for _ in range(self.config.concurrency)]
            tasks.append(asyncio.create_task(self._poller(channel)))
            try:
                await fault_coro
            finally:
                self._stop.set()
                await asyncio.gather(*tasks, return_exceptions=True)

    def first_health(self, status: int, after: float) -> float | None:
        return next((t for t, s in self.health if t >= after and s == status), None)

    def first_ok(self, after: float) -> float | None:
        return min((end for start, end, code in self.calls if start >= after and code == "OK"), default=None)


async def _wait_until(predicate, timeout_s: float, poll_s: float = 0.05) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if predicate():
            return True
        await asyncio.sleep(poll_s)
    return predicate()


async def run_cycle(fault: str, outage_s: float, triton, target: str, config: FaultConfig) -> CycleReport:
    """One fault on a SERVING gateway whose backend is `triton` (exporters.triton.TritonServer)."""
    if fault not in FAULTS:
        raise ValueError(f"unknown fault {fault!r}; choose from {FAULTS}")
    recorder = Recorder(target, config)
    marks: dict[str, float] = {}

    async def inject() -> None:
        await asyncio.sleep(config.steady_s)
        pid = triton.pid
        marks["fault"] = time.monotonic()
        signal_group(pid, signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
        if fault == "kill":
            await asyncio.to_thread(triton.stop)  # reaps the killed group, frees the work folder
        await asyncio.sleep(outage_s)
        if fault == "kill":
            marks["restart"] = time.monotonic()
            await asyncio.to_thread(triton.start)  # same ports; returns once Triton is ready
        else:
            signal_group(pid, signal.SIGCONT)
        marks["back"] = time.monotonic()
        back = marks["back"]
        await _wait_until(lambda: (recorder.first_ok(back) is not None and recorder.first_health(SERVING, back)
                                   is not None) or triton.poll() is not None, config.recover_timeout_s)

    await recorder.run(inject())
    fault_at, back = marks["fault"], marks["back"]
    # The outage: calls made and answered while the backend was surely down. A killed Triton
    # is down until its restart begins (triton.start returns only after a readiness poll,
    # by when a fast restart may already be serving); a frozen one until SIGCONT.
    down_until = marks.get("restart", back)
    during = [(start, end, code) for start, end, code in recorder.calls if start >= fault_at and end <= down_until]
    codes: dict[str, int] = {}
    outage_codes: dict[str, int] = {}
    for _, _, code in recorder.calls:
        codes[code] = codes.get(code, 0) + 1
    for _, _, code in during:
        outage_codes[code] = outage_codes.get(code, 0) + 1
    overshoot = [end - start - config.call_timeout_s for start, end, code in recorder.calls
                 if code == "DEADLINE_EXCEEDED"]
    detect = recorder.first_health(NOT_SERVING, fault_at)
    ok = recorder.first_ok(back)
    serving = recorder.first_health(SERVING, back)
    return CycleReport(
        fault=fault, outage_s=round(outage_s, 3), detect_s=_round(detect - fault_at if detect else None),
        outage_codes=dict(sorted(outage_codes.items())), outage_ms=Percentiles.of([e - s for s, e, _ in during]),
        deadline_overshoot_ms=Percentiles.of(overshoot),
        restart_s=_round(back - marks["restart"] if "restart" in marks else None),
        recover_ok_s=_round(ok - back if ok else None), recover_serving_s=_round(serving - back if serving else None),
        codes=dict(sorted(codes.items())),
        triton_exit=None if triton.poll() is None else f"exit code {triton.poll()}:\n{triton.log_tail(60)}")


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def schedule(seed: int, cycles: int, config: FaultConfig) -> list[tuple[str, float]]:
    """(fault, outage seconds) per cycle: alternating kinds, outage lengths from the seed."""
    rng = np.random.default_rng(seed)
    return [(FAULTS[i % len(FAULTS)], float(rng.uniform(*config.outage_s))) for i in range(cycles)]


def print_table(reports: list[CycleReport]) -> None:
    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    print(f"{'#':>2} {'fault':<6} {'outage s':>8} {'detect s':>8} {'outage calls':<40} {'p99 ms':>8} "
          f"{'overshoot p99 ms':>16} {'restart s':>9} {'first OK s':>10} {'SERVING s':>9}")
    for i, r in enumerate(reports):
        calls = ", ".join(f"{k} {v}" for k, v in r.outage_codes.items()) or "-"
        print(f"{i:>2} {r.fault:<6} {r.outage_s:>8.2f} {f(r.detect_s):>8} {calls:<40} "
              f"{f(r.outage_ms.p99 if r.outage_ms else None):>8} "
              f"{f(r.deadline_overshoot_ms.p99 if r.deadline_overshoot_ms else None):>16} {f(r.restart_s):>9} "
              f"{f(r.recover_ok_s):>10} {f(r.recover_serving_s):>9}")
    for i, r in enumerate(reports):
        if r.triton_exit is not None:
            print(f"cycle {i}: Triton died after the {r.fault} ({r.triton_exit.splitlines()[0]}); restarted for the next")
    print("detect: fault -> first NOT_SERVING; first OK / SERVING: Triton back (ready or thawed) -> first OK call / "
          "SERVING answer")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-set", type=Path, help="model set (default: the tiny set in --work-dir)")
    parser.add_argument("--work-dir", type=Path, help="tiny set, Triton repository, logs (default: a temp dir)")
    parser.add_argument("--cycles", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0, help="the fault schedule (kinds alternate; outage lengths)")
    parser.add_argument("--outage", type=float, nargs=2, default=(2.0, 6.0), metavar=("LOW", "HIGH"),
                        help="outage length range in seconds")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--call-timeout", type=float, default=2.0)
    parser.add_argument("--health-interval", type=float, default=0.25, help="the gateway's readiness re-check (s)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from exporters.triton import TritonServer

    config = FaultConfig(concurrency=args.concurrency, call_timeout_s=args.call_timeout, outage_s=tuple(args.outage))
    plan = schedule(args.seed, args.cycles, config)
    meta = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "load_average_before": os.getloadavg(), "cpus": os.cpu_count(), "seed": args.seed,
            "config": dataclasses.asdict(config), "health_interval_s": args.health_interval,
            "command": " ".join(sys.argv)}
    reports: list[CycleReport] = []
    with tempfile.TemporaryDirectory(prefix="faceedit-faults-") as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        served = model_subset(args.model_set or tiny_model_set(work), work / "fault-set", FAULT_MODELS)
        repo = triton_repository(served, work / "fault-repo")
        with TritonServer(repo, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port()) as triton, \
                GatewayProcess(served, work, "triton", triton.grpc_url, health_interval_s=args.health_interval,
                               log_level="INFO") as gateway:
            wait_serving(gateway.target, 120)
            for i, (fault, outage) in enumerate(plan):
                log.info("cycle %d: %s for %.2f s", i, fault, outage)
                reports.append(asyncio.run(run_cycle(fault, outage, triton, gateway.target, config)))
                if reports[-1].triton_exit is not None:  # reported; a fresh Triton for the next cycle
                    log.error("cycle %d: Triton died after the %s: %s", i, fault, reports[-1].triton_exit)
                    triton.stop()
                    triton.start()
                wait_serving(gateway.target, config.recover_timeout_s)
    meta["load_average_after"] = os.getloadavg()
    print_table(reports)
    print(f"load average before {meta['load_average_before']}, after {meta['load_average_after']}; {meta['cpus']} CPUs")
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "cycles": [r.to_dict() for r in reports]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
