"""One versioned JSON document from every command (normopt/report.schema.json): --json prints it
to stdout, --report writes the same; errors too."""

from __future__ import annotations

import copy
import json

import jsonschema
import pytest

from normopt.schema import SCHEMA_VERSION, schema
from tests.helpers import mlp, save
from tests.test_cli import run

VALIDATOR = jsonschema.Draft202012Validator(
    schema(), format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
)


def document(proc, code: int = 0) -> dict:
    """The one JSON document on stdout, checked against the schema."""
    assert proc.returncode == code, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    doc = json.loads(proc.stdout)  # the whole of stdout: one document, nothing else
    VALIDATOR.validate(doc)
    assert (
        doc["schema_version"] == SCHEMA_VERSION
        and doc["exit_code"] == code
        and doc["ok"] == (code == 0)
    )
    assert doc["versions"]["normopt"] and doc["versions"]["onnxruntime"]
    return doc


def test_the_schema_is_a_valid_json_schema():
    jsonschema.Draft202012Validator.check_schema(schema())


@pytest.mark.slow
def test_every_command_prints_one_document_of_the_schema(tmp_path, corpus, cli_env):
    src, out = corpus("gpt2-ts14").model, tmp_path / "out.onnx"
    report = tmp_path / "rewrite.json"
    rewrite = document(run("rewrite", src, out, "--json", "--report", report, env=cli_env))
    assert json.loads(report.read_text()) == rewrite
    converted = [c for c in rewrite["changes"] if c["kind"] == "converted"]
    stats = next(p["stats"] for p in rewrite["passes"] if p["name"] == "preln-to-rmsnorm")
    assert len(converted) == stats["converted"] > 3 and all(
        c["nodes"] and c["values"] for c in converted
    )
    assert "more)" not in json.dumps(rewrite)  # nothing is cut
    assert rewrite["inputs"]["source"] == "generated" and len(rewrite["inputs"]["trials"]) == 2
    assert rewrite["seconds"]["total"] > 0 and rewrite["verification"]["ok"]

    inspect = document(run("inspect", src, "--json", env=cli_env))
    assert inspect["command"] == "inspect" and inspect["architecture"] == "pre-ln"

    verify = document(
        run(
            "verify",
            src,
            out,
            "--json",
            "--trials",
            "1",
            "--report",
            tmp_path / "v.json",
            env=cli_env,
        )
    )
    assert (
        verify["ok"] and verify["inputs"]["trials"][0] == rewrite["inputs"]["trials"][0]
    )  # same seed, same hashes
    assert json.loads((tmp_path / "v.json").read_text()) == verify

    profile = document(
        run("profile", src, out, "--runs", "2", "--warmup", "0", "--json", env=cli_env)
    )
    assert profile["models"] == [str(src), str(out)] and profile["environment"]["threads"] == 2

    passes = document(run("passes", "--json", "--report", tmp_path / "p.json", env=cli_env))
    assert (
        "preln-to-rmsnorm" in passes["passes"]
        and json.loads((tmp_path / "p.json").read_text())["passes"] == passes["passes"]
    )


def test_an_error_is_a_document_too(tmp_path, cli_env):
    missing = tmp_path / "missing.onnx"
    for args in (
        ("inspect", missing),
        ("verify", missing, missing),
        ("profile", missing),
        ("rewrite", missing, tmp_path / "o.onnx"),
    ):
        proc = run(*args, "--json", env=cli_env)
        doc = document(proc, 2)
        assert doc["command"] == args[0] and "missing.onnx" in doc["error"]
        assert proc.stderr.count("\n") == 1  # the one error line stays on stderr


def test_a_failing_verification_is_a_document_with_exit_1(tmp_path, cli_env):
    a, b = save(mlp(0), tmp_path / "a.onnx"), save(mlp(1), tmp_path / "b.onnx")
    doc = document(run("verify", a, b, "--json", env=cli_env), 1)
    assert doc["error"] is None and not doc["outputs"][0]["ok"] and doc["outputs"][0]["max_abs"] > 0


def test_a_report_never_replaces_an_input(tmp_path, cli_env):
    model = save(mlp(), tmp_path / "m.onnx", external=True)
    data = next(p for p in tmp_path.iterdir() if p.name != "m.onnx")
    before = data.read_bytes()
    proc = run("inspect", model, "--report", data, env=cli_env)
    assert proc.returncode == 2 and "input data file" in proc.stderr and data.read_bytes() == before


def test_the_schema_rejects_a_change_without_its_nodes(tmp_path, cli_env):
    doc = document(
        run("rewrite", save(mlp(), tmp_path / "m.onnx"), tmp_path / "o.onnx", "--json", env=cli_env)
    )
    broken = copy.deepcopy(doc)
    broken["changes"] = [
        {"pass": "cleanup", "kind": "removed", "what": "dead node(s)", "values": [], "why": None}
    ]
    with pytest.raises(jsonschema.ValidationError, match="'nodes' is a required property"):
        VALIDATOR.validate(broken)
    with pytest.raises(jsonschema.ValidationError):
        VALIDATOR.validate({**doc, "schema_version": 2})
