"""``layerpair-export check REPORT --baseline BASELINE``: a CI regression gate over two ``report.json`` files.

Schema read (everything else in the reports is ignored)::

    {
      "accuracy": {                      # added by the evaluation step (``layerpair-export eval``)
        "ppl_ratio": 1.031,              # perplexity of this model / perplexity of the original (lower is better)
        "top1_agreement": 0.962          # fraction of positions whose argmax equals the original's (0..1)
      },
      "latency": {                       # added by a benchmark step; milliseconds, lower is better
        "decode_ms_per_token": 3.10,     # any numeric key is a latency metric
        "prefill_ms": 41.2,
        "same_run_baseline": {           # optional: the *baseline* model timed in the same run, same keys
          "decode_ms_per_token": 3.40
        }
      }
    }

Accuracy may instead come from the JSON ``layerpair-export eval --json`` writes (``onnx.text`` or
``pytorch.text``: ``ppl_ratio``, ``top1``), so an eval result can be gated directly (``ACCURACY_SOURCES``).

Checks (thresholds come from flags; defaults in ``DEFAULTS``):

* ``ppl_ratio``: ``report.ppl_ratio - baseline.ppl_ratio <= --max-ppl-ratio-increase``.
* ``top1_agreement``: ``report.top1_agreement >= --min-top1`` (an absolute floor; the baseline's value is shown).
* ``latency <key>``: ``report.latency[key] / ref[key] <= --max-latency-ratio`` for every key present in the
  report, where ``ref`` is the report's own ``same_run_baseline`` when it holds the key (same machine, same
  moment: shared CI machines are noisy, so a ratio of two timings taken minutes apart on different hosts is
  much less trustworthy), else the BASELINE file's ``latency``.

A metric missing from either file is "not measured". If its threshold flag was given explicitly, that is a
failure (the gate was asked to guard something nobody measured); otherwise it is reported as skipped, never as
a silent pass. Exit status: 0 all checks pass (at least one ran), 1 a regression, a requested metric missing, or
no check ran at all (nothing measured in both files), 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

from layerpair.errors import InputError

DEFAULTS = {"max_ppl_ratio_increase": 0.02, "min_top1": 0.90, "max_latency_ratio": 1.10}
SAME_RUN_KEY = "same_run_baseline"
PASS, FAIL, SKIP = "PASS", "FAIL", "NOT MEASURED"
EXIT_REGRESSION = 1
EXIT_NOTHING_CHECKED = 1  # a gate that checked nothing must not pass CI


@dataclass
class CheckResult:
    name: str
    value: float | None  # the report's metric (None: not measured)
    reference: float | None  # what it is compared with (baseline value), None if not measured / not applicable
    threshold: str  # human-readable rule, e.g. "<= +0.0200"
    status: str  # PASS | FAIL | NOT MEASURED
    detail: str  # one line: why

    @property
    def failed(self) -> bool:
        return self.status == FAIL


def load_report(path: Path, role: str) -> dict[str, Any]:
    """Parse ``path`` as a JSON object; any problem is one InputError line naming the file and the fix."""
    fix = f"pass the report.json of an export as {role}"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{role} '{path}' does not exist", fix) from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read {role} '{path}' ({type(e).__name__})", fix) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(
            f"{role} '{path}' is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})", fix
        ) from None
    if not isinstance(data, dict):
        raise InputError(f"{role} '{path}' holds a JSON {type(data).__name__}, not an object", fix)
    return data


def _number(report: dict[str, Any], section: str, key: str, role: str) -> float | None:
    """``report[section][key]`` as a float, None if absent; a present non-number is bad input."""
    sec = report.get(section)
    if sec is None:
        return None
    if not isinstance(sec, dict):
        raise InputError(f"{role}: '{section}' must be an object, got {type(sec).__name__}", "fix the report")
    v = sec.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise InputError(f"{role}: '{section}.{key}' must be a finite number, got {v!r}", "fix the report")
    return float(v)


# Where accuracy figures may live, in order: report.json's own section, then the JSON that
# ``layerpair-export eval --json`` writes (ONNX Runtime figures preferred over PyTorch ones).
ACCURACY_SOURCES = (("accuracy",), ("onnx", "text"), ("pytorch", "text"))


def accuracy_view(report: dict[str, Any]) -> dict[str, Any]:
    """``report`` with an ``accuracy`` section {ppl_ratio, top1_agreement} taken from the first source present."""
    for path in ACCURACY_SOURCES:
        sec: Any = report
        for k in path:
            sec = sec.get(k) if isinstance(sec, dict) else None
        if isinstance(sec, dict) and ("ppl_ratio" in sec or "top1_agreement" in sec or "top1" in sec):
            top1 = sec.get("top1_agreement", sec.get("top1"))
            acc = {k: v for k, v in (("ppl_ratio", sec.get("ppl_ratio")), ("top1_agreement", top1)) if v is not None}
            return {**report, "accuracy": acc}
        if path == ("accuracy",) and sec is not None:
            return report  # an explicit (even empty or malformed) section wins; _number reports problems
    return report


def _latency_metrics(report: dict[str, Any], role: str) -> dict[str, float]:
    sec = report.get("latency")
    if sec is None:
        return {}
    if not isinstance(sec, dict):
        raise InputError(f"{role}: 'latency' must be an object, got {type(sec).__name__}", "fix the report")
    return {k: v for k in sec if k != SAME_RUN_KEY and (v := _number(report, "latency", k, role)) is not None}


def _missing(name: str, requested: bool, threshold: str, which: str, ref: float | None = None) -> CheckResult:
    if requested:
        return CheckResult(name, None, ref, threshold, FAIL, f"{which}: not measured, but this threshold was requested")
    return CheckResult(name, None, ref, threshold, SKIP, f"{which}: not measured (threshold not requested)")


def checks_from_reports(
    report: dict[str, Any],
    baseline: dict[str, Any],
    max_ppl_ratio_increase: float | None = None,
    min_top1: float | None = None,
    max_latency_ratio: float | None = None,
) -> list[CheckResult]:
    """Every check; a threshold of None means "not requested" (the default applies, missing data is a skip)."""
    out: list[CheckResult] = []
    report, baseline = accuracy_view(report), accuracy_view(baseline)

    req = max_ppl_ratio_increase is not None
    lim = DEFAULTS["max_ppl_ratio_increase"] if max_ppl_ratio_increase is None else max_ppl_ratio_increase
    rule = f"<= baseline {lim:+.4f}"
    v, b = _number(report, "accuracy", "ppl_ratio", "REPORT"), _number(baseline, "accuracy", "ppl_ratio", "BASELINE")
    if v is None or b is None:
        which = " and ".join(w for w, x in (("REPORT", v), ("BASELINE", b)) if x is None) + " accuracy.ppl_ratio"
        out.append(_missing("ppl_ratio", req, rule, which, b))
    else:
        ok = v - b <= lim + 1e-12  # equal reports must pass whatever float noise the subtraction has
        out.append(
            CheckResult("ppl_ratio", v, b, rule, PASS if ok else FAIL, f"increase {v - b:+.4f} (limit {lim:+.4f})")
        )

    req = min_top1 is not None
    floor = DEFAULTS["min_top1"] if min_top1 is None else min_top1
    rule = f">= {floor:.4f}"
    v, b = (
        _number(report, "accuracy", "top1_agreement", "REPORT"),
        _number(baseline, "accuracy", "top1_agreement", "BASELINE"),
    )
    if v is None:
        out.append(_missing("top1_agreement", req, rule, "REPORT accuracy.top1_agreement", b))
    else:
        ok = v >= floor
        out.append(CheckResult("top1_agreement", v, b, rule, PASS if ok else FAIL, f"{v:.4f} vs floor {floor:.4f}"))

    req = max_latency_ratio is not None
    lim = DEFAULTS["max_latency_ratio"] if max_latency_ratio is None else max_latency_ratio
    rule = f"ratio <= {lim:.3f}"
    ours = _latency_metrics(report, "REPORT")
    same_run = report.get("latency", {}).get(SAME_RUN_KEY) if isinstance(report.get("latency"), dict) else None
    if same_run is not None and not isinstance(same_run, dict):
        raise InputError(f"REPORT: 'latency.{SAME_RUN_KEY}' must be an object", "fix the report")
    same = _latency_metrics({"latency": same_run or {}}, "REPORT same_run_baseline")
    theirs = _latency_metrics(baseline, "BASELINE")
    if not ours:
        out.append(_missing("latency", req, rule, "REPORT latency"))
    for key, ms in ours.items():
        name = f"latency {key}"
        ref, src = (same[key], "same run") if key in same else (theirs.get(key), "BASELINE file")
        if ref is None:
            out.append(_missing(name, req, rule, f"BASELINE latency.{key}"))
        elif ref <= 0:
            raise InputError(f"baseline latency '{key}' is {ref}, not positive", "fix the report")
        else:
            r = ms / ref
            status = PASS if r <= lim + 1e-12 else FAIL
            out.append(CheckResult(name, ms, ref, rule, status, f"ratio {r:.3f} vs {src}"))
    return out


def table_from_checks(results: Sequence[CheckResult]) -> str:
    def f(x: float | None) -> str:
        return "-" if x is None else f"{x:.4f}"

    rows = [("check", "report", "baseline", "threshold", "status", "detail")]
    rows += [(r.name, f(r.value), f(r.reference), r.threshold, r.status, r.detail) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row[:5], widths, strict=True)) + "  " + row[5] for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def json_from_checks(results: Sequence[CheckResult], report: Path, baseline: Path) -> dict[str, Any]:
    return {
        "passed": not any(r.failed for r in results) and any(r.status == PASS for r in results),
        "report": str(report),
        "baseline": str(baseline),
        "checks": [asdict(r) for r in results],
    }


def junit_from_checks(results: Sequence[CheckResult]) -> str:
    """JUnit XML (one testcase per check; FAIL -> <failure>, NOT MEASURED -> <skipped>), as CI systems read it."""
    suite = ET.Element(
        "testsuite",
        name="layerpair-export check",
        tests=str(len(results)),
        failures=str(sum(r.failed for r in results)),
        skipped=str(sum(r.status == SKIP for r in results)),
        errors="0",
    )
    for r in results:
        case = ET.SubElement(suite, "testcase", classname="layerpair.check", name=r.name)
        msg = f"{r.name}: {r.detail} (threshold {r.threshold})"
        if r.failed:
            ET.SubElement(case, "failure", message=msg, type="regression").text = msg
        elif r.status == SKIP:
            ET.SubElement(case, "skipped", message=msg)
    suites = ET.Element("testsuites")
    suites.append(suite)
    ET.indent(suites)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a sibling temp file, so a failure never leaves half a file."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"output '{path}' is a directory", "pass a file path")
    if not path.parent.is_dir():
        raise InputError(f"cannot write '{path}': directory '{path.parent}' does not exist", "create it first")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="layerpair-export check",
        description="CI regression gate: compare a report.json against a baseline report.json "
        "(accuracy.ppl_ratio, accuracy.top1_agreement, latency.*). Exit 1 on regression.",
    )
    p.add_argument("report", type=Path, help="report.json of the candidate")
    p.add_argument("--baseline", type=Path, required=True, help="report.json to compare against")
    p.add_argument(
        "--max-ppl-ratio-increase",
        type=float,
        default=None,
        help="allowed increase of accuracy.ppl_ratio over the baseline's "
        f"(default {DEFAULTS['max_ppl_ratio_increase']})",
    )
    p.add_argument(
        "--min-top1",
        type=float,
        default=None,
        help=f"floor for accuracy.top1_agreement (default {DEFAULTS['min_top1']})",
    )
    p.add_argument(
        "--max-latency-ratio",
        type=float,
        default=None,
        help=f"allowed latency / baseline latency (default {DEFAULTS['max_latency_ratio']})",
    )
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the results as JSON")
    p.add_argument("--junit", type=Path, default=None, metavar="OUT.xml", help="also write JUnit XML")
    return p


def check_cli(argv: Sequence[str]) -> int:
    args = check_parser().parse_args(argv)
    for flag, v in (
        ("--max-ppl-ratio-increase", args.max_ppl_ratio_increase),
        ("--min-top1", args.min_top1),
        ("--max-latency-ratio", args.max_latency_ratio),
    ):
        if v is not None and not math.isfinite(v):
            raise InputError(f"{flag} must be a finite number, got {v}", f"pass e.g. {flag} 0.05")
    if args.min_top1 is not None and not 0 <= args.min_top1 <= 1:
        raise InputError(f"--min-top1 must be in [0, 1], got {args.min_top1}", "pass e.g. --min-top1 0.9")
    if args.max_latency_ratio is not None and args.max_latency_ratio <= 0:
        raise InputError(f"--max-latency-ratio must be positive, got {args.max_latency_ratio}", "pass e.g. 1.1")
    report = load_report(args.report, "REPORT")
    baseline = load_report(args.baseline, "BASELINE")
    results = checks_from_reports(report, baseline, args.max_ppl_ratio_increase, args.min_top1, args.max_latency_ratio)
    if args.json is not None:
        write_atomic(args.json, json.dumps(json_from_checks(results, args.report, args.baseline), indent=2) + "\n")
    if args.junit is not None:
        write_atomic(args.junit, junit_from_checks(results))
    print(table_from_checks(results))
    failed = [r.name for r in results if r.failed]
    if failed:
        print(f"REGRESSION: {len(failed)} check(s) failed: {', '.join(failed)}")
        return EXIT_REGRESSION
    passed = sum(r.status == PASS for r in results)
    if passed == 0:
        print(
            "NOTHING CHECKED: no metric is measured in both REPORT and BASELINE (accuracy.ppl_ratio, "
            "accuracy.top1_agreement, latency.*); add the eval/benchmark results to the reports"
        )
        return EXIT_NOTHING_CHECKED
    print(f"OK: {passed} passed, {sum(r.status == SKIP for r in results)} not measured")
    return 0
