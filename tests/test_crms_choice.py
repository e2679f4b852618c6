"""`rewrite --crms off|on|auto`: which pipeline runs, and what auto keeps for each timing outcome.

The timings are canned (profiling.compare replaced) where the test is about the choice, so it
does not depend on this machine's speed; one test times for real and asserts only what holds
whichever variant wins."""

import json
import subprocess
import sys

import onnx
import pytest

from normopt import crms_choice, variants
from normopt.errors import BadInput
from normopt.passes.pipeline import DEFAULT_PIPELINE
from normopt.profiling import Figure
from normopt.request import RewriteRequest
from normopt.verification import VerifyOptions
from tests.helpers import assert_matches_reference, rewrite_file
from tests.test_schema import VALIDATOR

PASSES = ["preln-to-rmsnorm", "preln-to-crmsnorm"]


def _pipeline(passes, crms):
    return RewriteRequest("in.onnx", "out.onnx", passes=passes, crms=crms).pipeline()


def test_modes_pick_the_pipeline():
    default = list(DEFAULT_PIPELINE)
    assert _pipeline(None, None) == (default, "off")
    assert _pipeline(PASSES, None) == (PASSES, "auto")
    assert _pipeline(PASSES, "off") == (["preln-to-rmsnorm"], "off")
    names, mode = _pipeline(None, "auto")
    at = default.index("preln-to-rmsnorm")
    assert mode == "auto" and names[at : at + 2] == PASSES
    assert names[:at] + names[at + 2 :] == default[:at] + default[at + 1 :]
    with pytest.raises(BadInput, match="--passes does not name preln-to-crmsnorm"):
        _pipeline(["preln-to-rmsnorm"], "on")
    with pytest.raises(BadInput, match="--crms takes off, on or auto, not 'sometimes'"):
        _pipeline(None, "sometimes")


def _figure(ratio: float, verdict: str) -> Figure:
    return Figure(ratio, ratio - 0.01, ratio + 0.01, [ratio, ratio], 1.0, 1.1, verdict)


def _canned(crms_ratio: float, crms_verdict: str):
    calls = []

    def compare(rows, baseline, feeds, **kwargs):
        calls.append((dict(rows), baseline, kwargs.get("against")))
        return {
            "original": _figure(1.0, "baseline"),
            "RMS": _figure(0.95, "faster"),
            "CRMS": _figure(crms_ratio, crms_verdict),
        }

    return compare, calls


def _widths(path) -> set[int]:
    graph = onnx.load(path).graph
    return {i.dims[-1] for i in graph.initializer if len(i.dims) == 2 and i.dims[-1] in (63, 64)}


def test_auto_keeps_crms_where_it_times_faster(corpus, tmp_path, monkeypatch):
    compare, calls = _canned(0.9, "faster")
    monkeypatch.setattr(variants, "compare", compare)
    paths = corpus("preln-dyn18")
    out = tmp_path / "out.onnx"
    report = rewrite_file(
        paths.model, out, passes=PASSES, checks=VerifyOptions(inputs=paths.load_inputs())
    )
    rows, baseline, against = calls[0]
    assert (
        set(rows) == {"original", "RMS", "CRMS"}
        and baseline == "original"
        and against == {"CRMS": "RMS"}
    )
    assert (
        report.crms.kept == "CRMS"
        and report.crms.width == 64
        and report.crms.why.endswith("kept CRMS")
    )
    assert next(p for p in report.passes if p.name == "preln-to-crmsnorm").modified
    assert 63 in _widths(out) and 64 not in _widths(out)  # the stream is d-1 wide
    assert sorted(tmp_path.iterdir()) == [out]  # the RMS variant's staging is gone
    assert_matches_reference(out, paths)


@pytest.mark.parametrize("verdict", ["slower", "within noise"])
def test_auto_keeps_rms_where_crms_is_not_faster(corpus, tmp_path, monkeypatch, verdict):
    """Within noise the original width is kept; the pass shows as refused with the figures, the
    report's changes and node counts are the RMS rewrite's, and OUT equals the reference."""
    compare, _ = _canned(1.05 if verdict == "slower" else 1.0, verdict)
    monkeypatch.setattr(variants, "compare", compare)
    paths = corpus("preln-dyn18")
    out, report_path = tmp_path / "out.onnx", tmp_path / "report.json"
    report = rewrite_file(
        paths.model,
        out,
        passes=PASSES,
        checks=VerifyOptions(inputs=paths.load_inputs()),
        report_path=report_path,
    )
    assert report.crms.kept == "RMS" and f"x RMS ({verdict}): kept RMS" in report.crms.why
    assert set(report.crms.breakdown) == {"RMS", "CRMS"}  # where the time went, per variant
    crms = next(p for p in report.passes if p.name == "preln-to-crmsnorm")
    assert not crms.modified and crms.refusals[0].reason.startswith("--crms auto: CRMS")
    assert 64 in _widths(out) and 63 not in _widths(out)
    assert not any(c["pass"] == "preln-to-crmsnorm" for c in report.to_json()["changes"])
    assert sum(report.nodes_after.values()) == len(onnx.load(out).graph.node)
    assert json.loads(report_path.read_text())["crms_choice"]["kept"] == "RMS"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx", "report.json"]
    assert_matches_reference(out, paths)


def test_why_names_the_cause():
    slower = _figure(1.1, "slower")
    width = {
        "RMS": {"matmul_ms": 1.0, "other_ms": 1.0},
        "CRMS": {"matmul_ms": 1.3, "other_ms": 0.9},
    }
    assert (
        "the d-1 width (K or N = d-1 = 767, misaligned: d is a multiple of 8) is why"
        in crms_choice._why("RMS", slower, 768, width)
    )
    norms = {
        "RMS": {"matmul_ms": 1.0, "other_ms": 1.0},
        "CRMS": {"matmul_ms": 1.0, "other_ms": 1.3},
    }
    assert "the norms are why" in crms_choice._why("RMS", slower, 768, norms)
    assert crms_choice._why("CRMS", _figure(0.9, "faster"), 768, {}).endswith("kept CRMS")


def test_off_and_on_time_nothing(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(variants, "compare", lambda *a, **k: pytest.fail("timed"))
    paths = corpus("preln-dyn18")
    on = rewrite_file(paths.model, tmp_path / "on.onnx", passes=PASSES, crms="on", verify=False)
    assert on.crms is None and 63 in _widths(tmp_path / "on.onnx")
    off = rewrite_file(paths.model, tmp_path / "off.onnx", passes=PASSES, crms="off", verify=False)
    assert [p.name for p in off.passes] == ["preln-to-rmsnorm", "cleanup"] and 63 not in _widths(
        tmp_path / "off.onnx"
    )


def test_auto_timed_for_real_writes_a_verified_rewrite(corpus, tmp_path):
    """No canned figures: whichever variant wins, OUT is it, verified, and the JSON validates."""
    paths = corpus("preln-ts17")
    out = tmp_path / "out.onnx"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "normopt",
            "rewrite",
            str(paths.model),
            str(out),
            "--crms",
            "auto",
            "--json",
            "--inputs",
            str(paths.inputs),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    VALIDATOR.validate(doc)
    choice = doc["crms_choice"]
    assert choice["kept"] in ("CRMS", "RMS") and choice["width"] == 64 and doc["verification"]["ok"]
    assert (63 in _widths(out)) == (choice["kept"] == "CRMS")
    assert_matches_reference(out, paths)


def test_a_bad_mode_is_one_line_exit_2(corpus, tmp_path):
    out = tmp_path / "out.onnx"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "normopt",
            "rewrite",
            str(corpus("preln-dyn18").model),
            str(out),
            "--crms",
            "always",
        ],
        capture_output=True,
        text=True,
    )
    assert (
        proc.returncode == 2
        and proc.stderr.strip().splitlines()
        == ["normopt: error: --crms takes off, on or auto, not 'always'"]
        and not out.exists()
    )


def test_auto_for_tensorrt_is_refused_before_any_work(corpus, tmp_path):
    """onnxruntime cannot time TensorRT plugin nodes: auto (asked, or the default where the pass
    is named) is one line, exit 2, nothing written; --crms on emits the plugins."""
    model, out = corpus("preln-dyn18").model, tmp_path / "out.onnx"
    base = [
        sys.executable,
        "-m",
        "normopt",
        "rewrite",
        str(model),
        str(out),
        "--passes",
        ",".join(PASSES),
        "--target",
        "tensorrt",
        "--trt-version",
        "10.9",
    ]
    for extra in ([], ["--crms", "auto"]):
        proc = subprocess.run([*base, *extra], capture_output=True, text=True)
        assert (
            proc.returncode == 2
            and not out.exists()
            and proc.stderr.strip().splitlines()
            == [
                "normopt: error: --crms auto times the rewrites in onnxruntime, which cannot run "
                "TensorRT plugin nodes: "
                "pass --crms on (compare engines with normopt build and profile --backend "
                "tensorrt) or --crms off"
            ]
        )
    assert (
        subprocess.run([*base, "--crms", "on"], capture_output=True, text=True).returncode == 0
        and out.exists()
    )
