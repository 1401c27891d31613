"""One short GPU check of the runtime's CUDA paths: event timing, side streams, a hedged model.

    python scripts/gpu_check.py            # prints a JSON report; also writes $OUT/gpu_check.json

On a machine without CUDA it says so and exits 0 ("skipped"). On a GPU (a few seconds) it checks:
1. CudaStageTimer: events recorded on the stream, polled with query() (no synchronize in the hot
   path), a positive time that agrees with a synchronised wall-clock measurement;
2. SideStream: a student launched on a side stream finishes and matches the result computed on the
   default stream, while a long kernel queue runs on the default stream;
3. a FallbackModel on the GPU, hedged (primary on a worker thread with its own side stream): its
   answers match the eager primary, and a primary stalled by a long kernel queue falls back by the
   deadline (reason deadline_exceeded) instead of waiting for it.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

from fallbackformer.common.jsonsafe import dumps


def _report(result: dict) -> None:
    text = dumps(result, indent=2, where="gpu check")
    print(text)
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "gpu_check.json").write_text(text)


def main() -> int:
    if not torch.cuda.is_available():
        _report({"status": "skipped", "why": "no CUDA device (torch.cuda.is_available() is False)",
                 "torch": torch.__version__})
        return 0

    import fallbackformer as ff
    from fallbackformer.runtime.clock import CudaStageTimer, MonotonicClock
    from fallbackformer.runtime.hedging import SideStream
    from fallbackformer.runtime.testing import ConstHead, gate

    dev = torch.device("cuda")
    result: dict = {"status": "ok", "device": torch.cuda.get_device_name(0), "torch": torch.__version__, "checks": {}}
    checks = result["checks"]
    clock = MonotonicClock()

    # 1. event timing without synchronising
    x = torch.randn(4096, 4096, device=dev)
    torch.cuda.synchronize()
    timer = CudaStageTimer()
    wall0 = time.perf_counter()
    start = timer.begin()
    y = x
    for _ in range(20):
        y = (y @ x) / 4096
    timer.end(start, "matmuls", 1)
    queued_s = time.perf_counter() - wall0
    pending_right_after = timer.pending
    polled = timer.poll()  # non-blocking: usually empty, the kernels are still running
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - wall0) * 1e3
    timings = polled + timer.poll()
    checks["cuda_event_timing"] = {
        "event_ms": timings[0].ms if timings else None,
        "wall_ms_synchronised": wall_ms,
        "launch_ms": queued_s * 1e3,
        "pending_right_after_end": pending_right_after,
        "ok": bool(timings) and 0 < timings[0].ms <= wall_ms * 1.05,
    }

    # 2. a side stream runs the student beside a busy default stream
    student = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).to(dev).eval()
    xs = torch.randn(32, 1, 8, 8, device=dev)
    with torch.inference_mode():
        expected = student(xs)
        busy = x
        for _ in range(20):  # a long queue on the default stream
            busy = (busy @ x) / 4096
        side = SideStream(clock=clock)
        ticket = side.launch(student, xs)
        res = ticket.wait(clock.now_ns() + 5_000_000_000)
        checks["side_stream"] = {
            "status": res.status.value,
            "elapsed_ms": res.elapsed_ms,
            "ok": res.ok and torch.allclose(res.value, expected, atol=1e-5),
        }
        torch.cuda.synchronize()

    # 3. a hedged FallbackModel on the GPU
    class Busy(nn.Module):
        """A stage whose kernels take long when ``on`` (a stalled GPU)."""

        def __init__(self) -> None:
            super().__init__()
            self.on = False
            self.w = torch.randn(4096, 4096, device=dev)

        def forward(self, h):
            if self.on:
                z = self.w
                for _ in range(200):
                    z = (z @ self.w) / 4096
                h = h + 0 * z[:1, : h.shape[1]].sum()
            return h

    busy_stage = Busy()
    stages = [nn.Sequential(nn.Flatten(), nn.Linear(64, 32)), busy_stage, nn.Identity()]
    heads = {0: ConstHead(1, 0.0), 2: nn.Linear(32, 3)}
    primary = ff.MultiExitNet(stages, heads).to(dev).eval()
    student3 = nn.Sequential(nn.Flatten(), nn.Linear(64, 3)).to(dev).eval()

    class DevHead(nn.Module):  # ConstHead makes CPU tensors: move them
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, h):
            return self.inner(h).to(h.device)

    primary.heads["0"] = DevHead(ConstHead(1, 0.0))
    gates = [gate(0.99), gate(-float("inf")), gate(-float("inf"))]
    model = ff.FallbackModel(primary, student3, [g.to(dev) for g in gates],
                             ff.Policy(budget_ms=50.0, margin_ms=2.0, hedge="always")).eval()
    xg = torch.randn(16, 1, 8, 8, device=dev)
    with torch.inference_mode():
        model.warm_up(xg, repeats=5, discard=2)
        out = model(xg)
        ref = primary(xg)[-1].argmax(1)
        ok_answer = out.served_by == ["primary"] * 16 and torch.equal(out.prediction, ref)
        busy_stage.on = True
        t0 = time.perf_counter()
        stalled = model(xg)
        stalled_ms = (time.perf_counter() - t0) * 1e3
        busy_stage.on = False
        torch.cuda.synchronize()
    checks["hedged_model"] = {
        "healthy_served_by": sorted(set(out.served_by)),
        "healthy_matches_primary": ok_answer,
        "stalled_served_by": sorted(set(stalled.served_by)),
        "stalled_reasons": sorted(set(stalled.reason)),
        "stalled_latency_ms": stalled_ms,
        "budget_ms": 50.0,
        "ok": ok_answer and stalled_ms <= 55.0 and set(stalled.served_by) == {"student"},
        "stats": {k: v for k, v in model.stats().items() if k in ("served_by", "reasons", "hedge")},
    }
    model.close()
    result["status"] = "ok" if all(c["ok"] for c in checks.values()) else "failed"
    _report(result)
    return 0 if result["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
