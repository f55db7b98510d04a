"""Canary rollouts: a candidate version takes a share of the stable name's requests and is judged by
live figures, then promoted to Production or rolled back.

- The rollout lives in the registry, not in a server's memory: the candidate carries the alias
  `canary`, and the registered model's tag `loraflow.rollout` holds its weight, the policy and the
  Production gates (registry.py). A restarted server reads it back and routes as before; its live
  figures start again from zero.
- `promote -P stage=Canary` starts one, behind the Staging gate; `-P weight=0` stops it; promoting
  the candidate to Production (by hand, or by the server when it holds) ends it.
- The server counts each version's requests, errors, latency, output tokens and the share of
  answers the task's grammar accepts (`LiveStats`), and asks `verdict` after each poll.
"""

from __future__ import annotations

import hashlib
import math
import random
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from loraflow.job_configs import RolloutPolicy


def policy_of(rollout: dict) -> RolloutPolicy:
    """The policy a rollout (registry.rollout) was started with."""
    return RolloutPolicy.model_validate(rollout["policy"])


def check_weight(weight: Any) -> bool:
    return not isinstance(weight, bool) and isinstance(weight, (int, float)) and 0 < weight <= 1


def takes_candidate(weight: float, key: str | None) -> bool:
    """Whether a request goes to the candidate: the same key always lands on the same side (its
    hash picks a point in [0, 1)); a request without one is drawn at random."""
    if key:
        point = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2 ** 64
    else:
        point = random.random()
    return point < weight


@dataclass
class LiveStats:
    """One version's served requests. Latencies are kept for the last LATENCY_WINDOW answers."""

    LATENCY_WINDOW = 10_000

    requests: int = 0
    errors: int = 0
    output_tokens: int = 0
    scored: int = 0  # answers the grammar was asked about (non-streamed ones)
    valid: int = 0
    _latencies: deque = field(default_factory=lambda: deque(maxlen=LiveStats.LATENCY_WINDOW))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, latency_s: float, error: bool, output_tokens: int = 0, valid: bool | None = None) -> None:
        with self._lock:
            self.requests += 1
            self.errors += error
            self.output_tokens += output_tokens
            if valid is not None:
                self.scored += 1
                self.valid += valid
            self._latencies.append(latency_s)

    def figures(self) -> dict[str, float | int | None]:
        with self._lock:
            ordered = sorted(self._latencies)
            return {
                "requests": self.requests, "errors": self.errors,
                "error_rate": self.errors / self.requests if self.requests else None,
                "p50_ms": _quantile(ordered, 0.50), "p95_ms": _quantile(ordered, 0.95),
                "output_tokens": self.output_tokens, "scored": self.scored,
                "parse_validity": self.valid / self.scored if self.scored else None,
            }


def _quantile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return round(1000 * ordered[max(0, math.ceil(q * len(ordered)) - 1)], 1)  # nearest rank


@dataclass
class Verdict:
    decision: str  # wait, step (to a larger share), promote, roll back
    reasons: list[str]  # why, for the audit tags


def verdict(policy: RolloutPolicy, weight: float, candidate: dict, production: dict) -> Verdict:
    """Judge the candidate's figures at the current share against the policy and Production's
    figures over the same time (both counted on the stable name's routed requests only). It may be
    rolled back after `min_requests` requests, but it holds only once `min_requests` of its answers
    were scored by the task's grammar."""
    if candidate["requests"] < policy.min_requests:
        return Verdict("wait", [f"{candidate['requests']} of {policy.min_requests} requests"])
    failed = []
    if candidate["error_rate"] > policy.max_error_rate:
        failed.append(f"error rate {candidate['error_rate']:.3f} > {policy.max_error_rate:.3f}")
    validity, theirs = candidate["parse_validity"], production["parse_validity"]
    if validity is not None and validity < policy.min_parse_validity:
        failed.append(f"parse validity {validity:.3f} < {policy.min_parse_validity:.3f}")
    if validity is not None and theirs is not None and validity < theirs - policy.max_validity_drop:
        failed.append(f"parse validity {validity:.3f} < Production's {theirs:.3f} - {policy.max_validity_drop:.3f}")
    if candidate["p95_ms"] is not None and production["p95_ms"] \
            and candidate["p95_ms"] > production["p95_ms"] * policy.max_p95_ratio:
        failed.append(f"p95 {candidate['p95_ms']:.0f} ms > {policy.max_p95_ratio:.2f} x Production's "
                      f"{production['p95_ms']:.0f} ms")
    if failed:
        return Verdict("roll back", failed)
    if candidate["scored"] < policy.min_requests:  # never promoted on request counts alone
        return Verdict("wait", [f"{candidate['scored']} of {policy.min_requests} answers scored "
                                "(streamed answers are not)"])
    held = [f"held at {weight:.0%} over {candidate['requests']} requests"]
    return Verdict("step", held) if next_weight(policy, weight) is not None else Verdict("promote", held)


def next_weight(policy: RolloutPolicy, weight: float) -> float | None:
    return next((step for step in policy.steps if step > weight), None)
