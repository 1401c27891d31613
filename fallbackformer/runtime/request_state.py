"""RequestState: one call's bookkeeping, per sample, in the original order of the batch.

Who served each sample and why, the answers of each path that served (as tensors, joined into one
:class:`~fallbackformer.runtime.output.FallbackOutput` at the end), the stages' timings and the
primary's outcome. In a hedged call the caller and the worker that walks the primary share it: every
write holds its lock, and once the caller has answered at the deadline (:meth:`RequestState.freeze`)
the worker's writes are ignored.
"""

from __future__ import annotations

import threading

import torch

from fallbackformer.runtime import reasons as R
from fallbackformer.runtime.output import FallbackOutput

__all__ = ["RequestState"]


class RequestState:
    """Per-call bookkeeping, per sample, in the original order.

    Shared between the caller and a hedging worker in a hedged call (``shared``): every write then
    holds the lock, and after :meth:`freeze` (the caller answered at the deadline) the worker's
    writes are ignored.
    """

    __slots__ = (
        "b", "start_ns", "deadline_ns", "served_by", "n_served", "reason", "parts", "timings", "detail",
        "outcome", "num_classes", "probe", "primary_ms", "shared", "frozen", "student_done", "drift_scores", "lock",
        "seq", "live", "student_logits", "router_rejected", "student_late", "vetoed", "fallback_logits",
    )

    def __init__(
        self, b: int, start_ns: int, deadline_ns: int, seq: int, live: tuple[bool, ...]
    ) -> None:
        self.b = b
        self.seq = seq  # the call's number on its model
        self.live = live  # per stage: whether an exit after it can serve (FallbackModel._live_exits)
        self.start_ns = start_ns
        self.deadline_ns = deadline_ns
        self.served_by: list[str | None] = [None] * b
        self.n_served = 0
        self.reason = [""] * b
        # (idx, logits, confidence, prediction) of each path that served; idx None: the whole batch
        self.parts: list[tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.timings: list[tuple[str, int, float]] = []  # (stage, batch, ms): by the walking thread only
        self.detail = ""
        self.outcome: str | None = None
        self.num_classes = 0
        self.probe = False  # admission is lifted for this call (a liveness probe)
        self.primary_ms = 0.0
        self.shared = False
        self.frozen = False
        self.student_done = False
        self.drift_scores: torch.Tensor | None = None  # the first live gate's scores, for the drift check
        self.lock = threading.Lock()
        self.student_logits: torch.Tensor | None = None  # [B, C], computed first when a router decides
        self.router_rejected: torch.Tensor | None = None  # rows the router sent to the default after the final head
        self.student_late = False  # the student did not answer by the deadline: the default serves
        self.vetoed = False  # the agreement veto took answers back (their rows are re-filled in output())
        self.fallback_logits: torch.Tensor | None = None  # [B, C] the first rung's logits (a typed default reads them)

    # -- writes (the worker's are ignored once frozen) ----------------------------------------
    def freeze(self) -> None:
        with self.lock:
            self.frozen = True

    def add_detail(self, text: str) -> None:
        with self.lock:
            self.detail = f"{self.detail}; {text}" if self.detail else text

    def set_reason(
        self,
        idx: torch.Tensor | None,
        reason: str,
        b: int,
        caller: bool = False,
        only_unset: bool = False,
    ) -> None:
        """Give ``reason`` to samples ``idx`` (original indices; ``None``: all).

        Args:
            caller: the calling thread's own write (a worker's writes stop at the freeze).
            only_unset: keep the reason of samples that already have one.
        """
        if idx is not None and idx.numel() == 0:
            return
        with self.lock:
            if self.frozen and not caller:
                return
            rows = range(b) if idx is None else idx.tolist()
            for i in rows:
                if not (only_unset and self.reason[i]):
                    self.reason[i] = reason

    def serve(
        self,
        active: torch.Tensor | None,
        accept: torch.Tensor | None,
        name: str,
        logits: torch.Tensor,
        conf: torch.Tensor,
        prediction: torch.Tensor,
        b: int,
    ) -> bool:
        """Serve the accepted rows (``accept`` over ``active``; ``None``: all rows) by ``name``.

        Returns ``False`` (and serves nothing) when the call was already answered.
        """
        if accept is not None:
            rows = torch.nonzero(accept).flatten()
            idx = rows if active is None else active[rows]
            logits, conf, prediction = logits[rows], conf[rows], prediction[rows]
        else:
            idx = active
        with self.lock:
            if self.frozen:
                return False
            self.parts.append((idx, logits, conf, prediction))
            if idx is None:
                self.served_by = [name] * b
                self.n_served = b
            else:
                for i in idx.tolist():
                    self.served_by[i] = name
                self.n_served += int(idx.numel())
        return True

    def serve_student(
        self,
        idx: torch.Tensor,
        logits: torch.Tensor,
        accept: torch.Tensor,
        conf: torch.Tensor,
        prediction: torch.Tensor,
        b: int,
    ) -> None:
        """Serve the student's accepted rows (the caller's own write: never blocked by the freeze)."""
        self.serve_rung(R.STUDENT, idx, logits, accept, conf, prediction)

    def serve_rung(self, name: str, idx: torch.Tensor, logits: torch.Tensor, accept: torch.Tensor,
                   conf: torch.Tensor, prediction: torch.Tensor) -> None:
        """Serve a fallback rung's accepted rows by ``name`` (the caller's own write)."""
        rows = torch.nonzero(accept).flatten()
        if rows.numel() == 0:
            return
        chosen = idx[rows.to(idx.device)]
        with self.lock:
            self.parts.append((chosen, logits[rows], conf[rows], prediction[rows]))
            for i in chosen.tolist():
                self.served_by[i] = name
            self.n_served += int(chosen.numel())

    def keep_fallback_logits(self, idx: torch.Tensor, logits: torch.Tensor) -> None:
        """Remember a fallback rung's logits for rows ``idx`` (the first rung's stay)."""
        with self.lock:
            if self.fallback_logits is None:
                self.fallback_logits = torch.full((self.b, logits.shape[1]), float("nan"), device=logits.device)
            kept = self.fallback_logits
            fresh = ~torch.isfinite(kept[idx]).all(dim=1)
            kept[idx[fresh]] = logits[fresh].float()

    def unserve(self, idx: torch.Tensor, reason: str) -> None:
        """Take back the answers of rows ``idx`` (the veto refused them) and give them ``reason``; the
        caller's own write, after the primary's walk has returned. A row that already fell back for a
        trigger (a deadline, an error, an open breaker, low confidence, the router's preference) keeps
        it: that trigger is why it left the primary's path."""
        if idx.numel() == 0:
            return
        with self.lock:
            for i in idx.tolist():
                if self.served_by[i] is not None:
                    self.served_by[i] = None
                    self.n_served -= 1
                if not self.reason[i]:
                    self.reason[i] = reason
            self.vetoed = True

    def served_rows(self, names: frozenset[str] | set[str]) -> torch.Tensor:
        """Original indices of the rows served by one of ``names``."""
        with self.lock:
            rows = [i for i, s in enumerate(self.served_by) if s in names]
        return torch.tensor(rows, dtype=torch.long)

    # -- reads ---------------------------------------------------------------------------------
    def unserved(self, valid: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
        """Valid samples nobody served yet (original indices on ``device``), ``None`` when none."""
        with self.lock:
            if self.n_served == self.b:
                return None
            served = self.served_by
            if valid is None:
                rows = [i for i, s in enumerate(served) if s is None]
            else:
                rows = [i for i in valid.tolist() if served[i] is None]
        return torch.tensor(rows, dtype=torch.long, device=device) if rows else None

    def unserved_mask(self, idx: torch.Tensor) -> torch.Tensor:
        """BoolTensor over ``idx``: still unserved."""
        with self.lock:
            flags = [self.served_by[i] is None for i in idx.tolist()]
        return torch.tensor(flags, dtype=torch.bool, device=idx.device)

    def stage_ms_snapshot(self) -> list[float]:
        return [t[2] for t in list(self.timings)]  # a list copy is atomic under the GIL

    def output(self, latency_ms: float, request_id: str, default_prediction: int, device: torch.device) -> FallbackOutput:
        with self.lock:  # after the freeze nobody writes here again: the lists can be handed out
            self.frozen = True
            parts = self.parts
            served_by = self.served_by
            if None in served_by:
                served_by = [s if s is not None else R.DEFAULT for s in served_by]
            reason = self.reason
        b = self.b
        if parts and parts[0][1].is_cuda:  # made on a side stream by a hedged walk: keep them alive for ours
            current = torch.cuda.current_stream()
            for _, lg, cf, pd in parts:
                lg.record_stream(current)
                cf.record_stream(current)
                pd.record_stream(current)
        if len(parts) == 1 and parts[0][0] is None and not self.vetoed:  # one path served the whole batch
            _, logits, conf, prediction = parts[0]
            logits = logits if logits.dtype == torch.float32 else logits.float()
            confidence = conf if conf.dtype == torch.float32 else conf.float()
        else:
            num_classes = parts[0][1].shape[1] if parts else self.num_classes
            prediction = torch.full((b,), default_prediction, dtype=torch.long, device=device)
            confidence = torch.full((b,), float("nan"), device=device)
            logits = torch.full((b, num_classes), float("nan"), device=device)
            for idx, lg, cf, pd in parts:
                target = slice(None) if idx is None else idx.to(device)
                logits[target] = lg.float()
                prediction[target] = pd
                confidence[target] = cf.float()
            if self.vetoed:  # answers the veto took back and nobody served again: the default's
                back = [i for i, s in enumerate(self.served_by) if s is None]
                if back:
                    prediction[back] = default_prediction
                    confidence[back] = float("nan")
                    logits[back] = float("nan")
        return FallbackOutput(
            prediction=prediction,
            served_by=served_by,
            reason=reason,
            confidence=confidence,
            latency_ms=latency_ms,
            logits=logits,
            request_id=request_id,
        )
