"""What tracing one huge request costs a server: the Tracer's cap (in `offer`, on the request's
thread) and redaction (`_scrub`, on the logging thread), with the shipped serving config's
patterns, on pathological prompts of 50 KB to 1 MB (issue 36).

A regular expression holds the GIL while it runs, so its time is time in which the ingress
answers nobody. Each step is timed by its thread's CPU time (time.thread_time: what the machine's
other work does not inflate) and by the clock. Three paths:
- `old`: the patterns shipped before issue 36, on the whole text: run on growing sizes until one
  takes 2 s (quadratic: the next would take about 10), the rest extrapolated from the last two;
- `anchored_uncut`: the shipped patterns on the whole text (linear, but proportional to it);
- `shipped`: what a server does now: each string cut to traces.TRACED_CHARS, then the shipped
  patterns.
Writes benchmarks/results/trace-scrub.json. Run it in the train environment, nothing else running:

    .venvs/train/bin/python benchmarks/trace_scrub.py
"""

from __future__ import annotations

import datetime
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import machine
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
from loraflow import traces  # noqa: E402
from loraflow.job_configs import TracesConfig  # noqa: E402

SIZES = [50_000, 100_000, 250_000, 500_000, 1_000_000]  # characters (ASCII: bytes)
OLD_SIZES = [4_000, 8_000, 16_000, 32_000, *SIZES]  # until one takes OLD_LIMIT_S
OLD_LIMIT_S = 2.0
OLD_PATTERNS = (r"[\w.+-]+@[\w-]+(\.[\w-]+)+", r"\+?\d[\d ()-]{7,}\d")
# One run of the characters an e-mail's local part takes, with no @ (the cut, which never splits a
# word, keeps none of it); the same in runs of 8,000 with a space between (the cut keeps one run
# whole: the most a pattern is given); one run of digits (a word run and a card-number run at
# once); digits and spaces (a phone-number run).
TEXTS = {"word_run": "a.b-c_d+", "word_runs_of_8000": "a.b-c_d+" * 1000 + " ", "digits": "0123456789",
         "digits_and_spaces": "1234 "}


def request(kind: str, size: int) -> dict:
    text = (TEXTS[kind] * (size // len(TEXTS[kind]) + 1))[:size]
    return {"model": "tiny:production", "messages": [{"role": "user", "content": text}], "max_tokens": 8}


def timed(step, repeats: int) -> dict:
    """The fastest of `repeats` runs of step: its thread's CPU time and the clock's, in ms."""
    cpu = wall = float("inf")
    for _ in range(repeats):
        started_cpu, started = time.thread_time(), time.perf_counter()
        step()
        cpu, wall = min(cpu, time.thread_time() - started_cpu), min(wall, time.perf_counter() - started)
    return {"cpu_ms": round(1000 * cpu, 3), "wall_ms": round(1000 * wall, 3)}


def old_path(tracer, kind: str) -> dict:
    """The old patterns on growing sizes until one takes OLD_LIMIT_S; the sizes left extrapolated
    by the power law through the last two (k: 2 for quadratic, 1 for linear)."""
    measured: dict = {}
    for size in OLD_SIZES:
        body = request(kind, size)
        measured[size] = timed(lambda: tracer._scrub(body), 1)
        if measured[size]["cpu_ms"] > 1000 * OLD_LIMIT_S:
            break
    (small, a), (large, b) = list(measured.items())[-2:]
    k = math.log(max(b["cpu_ms"], 1e-3) / max(a["cpu_ms"], 1e-3)) / math.log(large / small)
    left = [size for size in SIZES if size not in measured]
    return {"measured": measured, "exponent_k": round(k, 2),
            "extrapolated_cpu_ms": {size: round(b["cpu_ms"] * (size / large) ** k) for size in left}}


def main() -> None:
    shipped = tuple(yaml.safe_load((ROOT / "configs/serve/default.yaml").read_text())["traces"]["redact"])
    new, old = (traces.Tracer(TracesConfig(redact=patterns), "run", "0") for patterns in (shipped, OLD_PATTERNS))
    results: dict = {}
    for kind in TEXTS:
        results[kind] = {"old": old_path(old, kind), "anchored_uncut": {}, "shipped": {}}
        for size in SIZES:
            body = request(kind, size)
            results[kind]["anchored_uncut"][size] = timed(lambda: new._scrub(body), 3)
            cut = timed(lambda: traces._each_string(body, traces._cut), 5)  # what offer does
            capped = traces._each_string(body, traces._cut)
            scrub = timed(lambda: new._scrub(capped), 5)  # what the logging thread does
            results[kind]["shipped"][size] = {"cap": cut, "scrub": scrub,
                                              "cpu_ms": round(cut["cpu_ms"] + scrub["cpu_ms"], 3)}
        print(kind, "1 MB: shipped", results[kind]["shipped"][SIZES[-1]]["cpu_ms"], "ms, anchored uncut",
              results[kind]["anchored_uncut"][SIZES[-1]]["cpu_ms"], "ms, old",
              results[kind]["old"]["extrapolated_cpu_ms"].get(SIZES[-1]), "ms (k", results[kind]["old"]["exponent_k"],
              ")", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    out = ROOT / "benchmarks" / "results" / "trace-scrub.json"
    out.write_text(json.dumps({
        "what": "the Tracer's cap and redaction of one request whose one message is SIZE characters of a "
                "pathological text; the fastest of 3 (anchored_uncut) or 5 (shipped) runs, one run for old",
        "machine": machine.describe(), "date": datetime.date.today().isoformat(), "commit": commit,
        "python": sys.version.split()[0], "load_average_1m": os.getloadavg()[0],  # other work on the machine
        "traced_chars": traces.TRACED_CHARS, "patterns": {"shipped": shipped, "old": OLD_PATTERNS},
        "old_note": f"the old patterns are run on growing sizes until one takes {OLD_LIMIT_S} s of CPU; the sizes "
                    "left are extrapolated (extrapolated_cpu_ms) by the power law through the last two measured",
        "texts": {kind: text[:20] + ("..." if len(text) > 20 else "") for kind, text in TEXTS.items()},
        "results": results, "command": "benchmarks/trace_scrub.py",
    }, indent=2) + "\n")
    print(f"-> {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
