"""rotate-stream: an exact orthogonal rotation of a Pre-RMSNorm residual stream, on the corpus's
Pre-LN and Pre-RMSNorm exports (both exporters, KV-cache decoders, onnxruntime-fused graphs, a
mixed-precision copy: equal to the reference with onnxruntime alone as the judge), hand-built
graphs, and a refusal per precondition that fails."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from normopt.errors import BadInput, NotApplied
from normopt.passes.rotate_stream import MARK
from normopt.verification import VerifyOptions
from tests.helpers import assert_matches_reference, cli, ort_run, rewrite_file, save

D, VOCAB = 8, 16


def _rms(nodes, inits, x: str, tag: str, gamma: np.ndarray | None, gamma_input: str | None = None):
    """A decomposed RMSNorm over the last axis (opset 17), scaled by a constant or an input."""
    inits += [
        numpy_helper.from_array(np.array(2.0, np.float32), f"{tag}.two"),
        numpy_helper.from_array(np.array(1e-5, np.float32), f"{tag}.eps"),
    ]
    nodes += [
        helper.make_node("Pow", [x, f"{tag}.two"], [f"{tag}.sq"]),
        helper.make_node("ReduceMean", [f"{tag}.sq"], [f"{tag}.ms"], axes=[-1]),
        helper.make_node("Add", [f"{tag}.ms", f"{tag}.eps"], [f"{tag}.mse"]),
        helper.make_node("Sqrt", [f"{tag}.mse"], [f"{tag}.rms"]),
        helper.make_node("Div", [x, f"{tag}.rms"], [f"{tag}.n"]),
    ]
    scale = gamma_input or f"{tag}.gamma"
    if gamma is not None:
        inits.append(numpy_helper.from_array(gamma.astype(np.float32), scale))
    nodes.append(helper.make_node("Mul", [f"{tag}.n", scale], [f"{tag}.y"]))
    return f"{tag}.y"


def prermsnorm(
    reader: str = "MatMul",
    stream_output: bool = False,
    gamma_input: bool = False,
    writer: str = "table",
    extra: str = "",
    seed: int = 0,
) -> onnx.ModelProto:
    """ids -> table (a planted outlier column x40) -> one block x + W2 relu(RMSNorm(x) g W1) ->
    RMSNorm g -> head. `reader`: what reads the block's norm (MatMul, or Relu then MatMul);
    `stream_output`: the block's sum is a graph output too; `gamma_input`: the block norm's
    scale is a graph input; `writer`: "table", or "tanh" (the embedding through a Tanh);
    `extra`: "beta" (a per-entry constant Add after the final norm), "token_beta" (a constant
    per token there), "stream_reader" (a ReduceMax of the stream as an output), "branch_reader"
    (the branch output an output too)."""
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((VOCAB, D)).astype(np.float32)
    table[:, 3] *= 40.0
    gamma = (1 + 0.1 * rng.standard_normal(D)).astype(np.float32)
    gamma[5] *= 30.0
    inits = [
        numpy_helper.from_array(table, "table"),
        numpy_helper.from_array(rng.standard_normal((D, 2 * D)).astype(np.float32) / 3, "W1"),
        numpy_helper.from_array(rng.standard_normal((2 * D, D)).astype(np.float32) / 3, "W2"),
        numpy_helper.from_array(rng.standard_normal(D).astype(np.float32), "b2"),
        numpy_helper.from_array(rng.standard_normal((D, VOCAB)).astype(np.float32), "head"),
    ]
    nodes = [helper.make_node("Gather", ["table", "ids"], ["emb"])]
    x0 = "emb"
    if writer == "tanh":
        nodes.append(helper.make_node("Tanh", ["emb"], ["x0"]))
        x0 = "x0"
    inputs = [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 4])]
    if gamma_input:
        inputs.append(helper.make_tensor_value_info("g", TensorProto.FLOAT, [D]))
    y = _rms(nodes, inits, x0, "ln1", None if gamma_input else gamma, "g" if gamma_input else None)
    if reader == "Relu":
        nodes.append(helper.make_node("Relu", [y], ["y.relu"]))
        y = "y.relu"
    nodes += [
        helper.make_node("MatMul", [y, "W1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["a1"]),
        helper.make_node("MatMul", ["a1", "W2"], ["h2"]),
        helper.make_node("Add", ["h2", "b2"], ["branch"]),
        helper.make_node("Add", [x0, "branch"], ["x1"]),
    ]
    yf = _rms(nodes, inits, "x1", "lnf", gamma[::-1].copy())
    if extra in ("beta", "token_beta"):
        shift = rng.standard_normal(D if extra == "beta" else (4, D)).astype(np.float32)
        inits.append(numpy_helper.from_array(shift, "beta"))
        nodes.append(helper.make_node("Add", [yf, "beta"], ["yf.beta"]))
        yf = "yf.beta"
    nodes.append(helper.make_node("MatMul", [yf, "head"], ["logits"]))
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [2, 4, VOCAB])]
    if stream_output:
        outputs.append(helper.make_tensor_value_info("x1", TensorProto.FLOAT, [2, 4, D]))
    if extra == "stream_reader":
        nodes.append(helper.make_node("ReduceMax", ["x1"], ["peak"], axes=[-1]))
        outputs.append(helper.make_tensor_value_info("peak", TensorProto.FLOAT, [2, 4]))
    if extra == "branch_reader":
        outputs.append(helper.make_tensor_value_info("branch", TensorProto.FLOAT, [2, 4, D]))
    graph = helper.make_graph(nodes, "prermsnorm", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _feeds(gamma_input: bool = False) -> dict:
    feeds = {"ids": np.random.default_rng(1).integers(0, VOCAB, (2, 4)).astype(np.int64)}
    if gamma_input:
        feeds["g"] = np.linspace(0.5, 2, D).astype(np.float32)
    return feeds


def _rotate(src, dst, **fields):
    return rewrite_file(src, dst, passes=["rotate-stream"], verify=False, **fields)


def _lines(report) -> list[str]:
    return next(p for p in report.passes if p.name == "rotate-stream").lines


def _equal(a, b, feeds, rtol: float = 1e-5) -> None:
    want, got = ort_run(onnx.load(str(a)), feeds), ort_run(onnx.load(str(b)), feeds)
    for name, value in want.items():
        scale = np.abs(value).max()
        assert np.abs(got[name] - value).max() <= rtol * scale, name


def test_the_rotation_is_exact_and_spreads_the_outliers(tmp_path):
    """The table's outlier column (x40) and the norms' outlier gammas (x30) leave: the rotated
    table's largest entry is a fraction of the original's, the readers' weights carry
    Q^T diag(g) W; the norms have scale 1; the outputs equal the original's. The report names Q
    and the model is marked."""
    src = save(prermsnorm(), tmp_path / "a.onnx")
    out = tmp_path / "b.onnx"
    report = _rotate(src, out)
    assert _lines(report) == [
        "rotated 1 residual stream(s) by Q = randomized Hadamard 8 (d = 8, seed 0)",
        "rotated 3 writer constant(s) along the hidden axis: W Q",
        "rotated 2 reader weight(s) on their input axis: Q^T diag(g) W",
        "folded 2 RMSNorm scale(s) (and beta) into their readers",
    ]
    _equal(src, out, _feeds())
    model = onnx.load(str(out))
    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    original = numpy_helper.to_array(prermsnorm().graph.initializer[0])
    assert np.abs(_table(out)).max() < 0.5 * np.abs(original).max()
    gammas = [w for k, w in weights.items() if "gamma" in k]
    assert len(gammas) == 2 and all(np.all(w == 1) for w in gammas)
    mark = json.loads({p.key: p.value for p in model.metadata_props}[MARK])
    assert mark == {
        "kind": "hadamard",
        "seed": 0,
        "d": 8,
        "q": "randomized Hadamard 8 (d = 8, seed 0)",
    }


def test_a_second_rotation_is_refused_as_done(tmp_path):
    src = save(prermsnorm(), tmp_path / "a.onnx")
    _rotate(src, tmp_path / "b.onnx")
    with pytest.raises(NotApplied, match="the stream is rotated already"):
        _rotate(tmp_path / "b.onnx", tmp_path / "c.onnx")


def test_random_rotations_by_seed_are_exact_and_differ(tmp_path):
    src = save(prermsnorm(), tmp_path / "a.onnx")
    tables = []
    for seed in (1, 2):
        out = tmp_path / f"r{seed}.onnx"
        rewrite_file(src, out, rotate="random", rotate_seed=seed, passes=None, verify=False)
        _equal(src, out, _feeds())
        tables.append(_table(out))
    assert not np.allclose(*tables)


def _table(path) -> np.ndarray:
    """The embedding table the model's Gather reads."""
    graph = onnx.load(str(path)).graph
    name = next(n.input[0] for n in graph.node if n.op_type == "Gather")
    return numpy_helper.to_array(next(i for i in graph.initializer if i.name == name))


def test_a_stream_output_is_un_rotated(tmp_path):
    """The block's sum is a graph output: it is un-rotated there (x Q^T), equal to the
    original's; inside, the final norm reads the rotated value."""
    src = save(prermsnorm(stream_output=True), tmp_path / "a.onnx")
    out = tmp_path / "b.onnx"
    report = _rotate(src, out)
    assert "restored 1 graph output(s) un-rotated: x Q^T" in _lines(report)
    _equal(src, out, _feeds())


def test_a_writer_no_constant_holds_is_rotated_online(tmp_path):
    """The embedding goes through a Tanh before the stream: x Q inserted after it."""
    src = save(prermsnorm(writer="tanh"), tmp_path / "a.onnx")
    out = tmp_path / "b.onnx"
    report = _rotate(src, out)
    online = [line for line in _lines(report) if "inserted x Q" in line]
    assert online and "Tanh" in online[0]
    _equal(src, out, _feeds())


def test_a_beta_after_a_norm_goes_into_its_readers_biases(tmp_path):
    """A LayerNorm's beta left as an Add after the final RMSNorm: b + beta W in the head's new
    bias, the Add gone; equal to the original."""
    src = save(prermsnorm(extra="beta"), tmp_path / "a.onnx")
    out = tmp_path / "b.onnx"
    _rotate(src, out)
    _equal(src, out, _feeds())
    graph = onnx.load(str(out)).graph
    assert "beta" not in {i.name for i in graph.initializer}
    assert any(n.op_type == "Add" and n.name.endswith("folded_bias") for n in graph.node)


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"reader": "Relu"}, "Relu node_[0-9]+ reads the RMSNorm at .*: only MatMul / Gemm"),
        ({"gamma_input": True}, "Mul node_[0-9]+ reads the RMSNorm at .*: only MatMul / Gemm"),
        ({"extra": "token_beta"}, "Add node_[0-9]+ after the RMSNorm at .* adds no per-entry"),
        ({"extra": "stream_reader"}, "ReduceMax node_[0-9]+ reads the stream value 'x1'"),
        ({"extra": "branch_reader"}, "the branch output 'branch' is read elsewhere too"),
    ],
)
def test_preconditions_that_fail_are_named(tmp_path, fields, reason):
    """A non-linear reader of a norm cannot take Q^T; nor can a norm scale the graph computes
    (adaLN's modulation): it cannot be folded into the readers, and does not commute with Q; a
    constant added per token after a norm is no beta to fold; a stream value or branch output
    something else reads would change for it."""
    model = prermsnorm(**fields)
    for i, node in enumerate(model.graph.node):
        node.name = node.name or f"node_{i}"
    with pytest.raises(NotApplied, match=reason):
        _rotate(save(model, tmp_path / "a.onnx"), tmp_path / "b.onnx")


def test_a_pre_ln_stream_needs_preln_to_rmsnorm_first(corpus, tmp_path):
    with pytest.raises(NotApplied, match=r"no RMSNorm \(run preln-to-rmsnorm first\)"):
        _rotate(corpus("gpt2-ts17").model, tmp_path / "b.onnx")


ROTATED = [  # every Pre-LN / Pre-RMSNorm export of the corpus (gpt2hidden: its hidden states
    # change with preln-to-rmsnorm's centring; their un-rotation is CLIP's and wav2vec2's)
    *(f"{f}-{e}" for f in ("gpt2", "opt", "bloom", "gptneox", "vit", "clip", "wav2vec2", "preln")
      for e in ("ts14", "ts17", "dyn18")),
    *(f"{f}-{e}" for f in ("gpt2kv", "optkv", "bloomkv", "phikv", "falconkv", "gptneoxkv",
                           "gpt2fused", "vitfused") for e in ("ts17", "dyn18")),
    *(f"llama-{e}" for e in ("ts14", "ts17", "dyn18", "dyn23")),
    "whisper-dyn18",
]  # fmt: skip


@pytest.mark.parametrize("name", ROTATED)
def test_corpus_exports_rotate_exactly(corpus, tmp_path, name):
    """`rewrite --rotate` (the default pipeline with rotate-stream after preln-to-rmsnorm),
    unverified: equal to the reference in onnxruntime. BLOOM's embedding LayerNorm and CLIP's
    pre-LayerNorm leave an explicit recentring (rotated online), CLIP's pooled output and
    wav2vec2's hidden state are un-rotated, the fused exports' Skip norms take the rotation,
    GPT-NeoX's parallel LayerNorms are converted though that does not pay alone."""
    paths = corpus(name)
    out = tmp_path / "out.onnx"
    report = rewrite_file(paths.model, out, rotate="hadamard", verify=False)
    lines = _lines(report)
    assert any(line.startswith("rotated 1 residual stream(s) by Q") for line in lines), lines
    assert any("reader weight(s)" in line for line in lines)
    assert_matches_reference(out, paths)


@pytest.mark.slow
def test_a_mixed_precision_export_rotates_within_float16(corpus, tmp_path):
    """onnxruntime's float16 converter (LayerNorms kept in float32): rotated in float64, rounded
    once to float16; as close to the float32 model as the float16 original (<= 1.5x)."""
    from tests.test_precision import _fp16

    paths = corpus("gpt2-dyn18")
    mixed = _fp16(paths.model, tmp_path / "fp16.onnx")
    out = tmp_path / "out.onnx"
    rewrite_file(mixed, out, rotate="hadamard", checks=VerifyOptions(inputs=paths.load_inputs()))
    feeds = paths.load_inputs()
    want = ort_run(onnx.load(str(paths.model)), feeds)
    for name, reference in want.items():
        original = np.abs(ort_run(onnx.load(str(mixed)), feeds)[name] - reference).max()
        rotated = np.abs(ort_run(onnx.load(str(out)), feeds)[name] - reference).max()
        assert rotated <= 1.5 * original, (name, rotated, original)


def test_rotate_and_crms_do_not_go_together(tmp_path):
    src = save(prermsnorm(), tmp_path / "a.onnx")
    with pytest.raises(BadInput, match="--rotate and --crms on do not go together"):
        rewrite_file(src, tmp_path / "b.onnx", rotate="hadamard", crms="on")
    with pytest.raises(BadInput, match="--passes does not name rotate-stream"):
        rewrite_file(src, tmp_path / "b.onnx", rotate="hadamard", passes=["cleanup"])


def test_cli_rotate(tmp_path):
    """`normopt rewrite --rotate random --rotate-seed 3`: written, verified, Q in the summary;
    an unknown kind is one line and exit 2."""
    src = save(prermsnorm(), tmp_path / "a.onnx")
    done = cli("rewrite", src, tmp_path / "b.onnx", "--rotate", "random", "--rotate-seed", "3")
    assert done.returncode == 0, done.stderr
    assert "random orthogonal 8 x 8 (seed 3)" in done.stdout
    bad = cli("rewrite", src, tmp_path / "c.onnx", "--rotate", "givens")
    assert bad.returncode == 2 and "kind is hadamard or random, not 'givens'" in bad.stderr
    assert not (tmp_path / "c.onnx").exists()


def test_a_norm_op_with_a_computed_scale_is_refused():
    """RMSNormalization (opset 23) reading its scale from the graph: no constant to fold."""
    import onnx_ir as ir

    from normopt.passes.rotate_stream import RotateStream
    from tests.helpers import annotate, supported_opset

    if supported_opset() < 23:
        pytest.skip("opset 23 needs a newer onnx and onnxruntime than installed")

    model = prermsnorm()
    graph = model.graph
    first = next(i for i, n in enumerate(graph.node) if n.output[0] == "ln1.y")
    norm = helper.make_node("RMSNormalization", ["emb", "g"], ["ln1.y"], axis=-1, epsilon=1e-5)
    del graph.node[first - 5 : first + 1]
    graph.node.insert(first - 5, norm)
    graph.input.append(helper.make_tensor_value_info("g", TensorProto.FLOAT, [D]))
    model.opset_import[0].version = 23
    ir_model = ir.serde.deserialize_model(model)
    annotate(ir_model)
    plan = RotateStream().plan(ir_model)
    assert not plan.applies
    assert "has no constant per-entry scale" in plan.why_not()


def test_a_post_ln_stream_is_refused(corpus, tmp_path):
    with pytest.raises(NotApplied, match="the stream is post-ln, not Pre-RMSNorm"):
        rewrite_file(corpus("bert-ts17").model, tmp_path / "b.onnx", rotate="hadamard")


def test_a_fused_norm_whose_statistics_are_read_is_refused(corpus):
    """onnxruntime's SkipSimplifiedLayerNormalization (GPT-2 as its optimizer fuses it, through
    preln-to-rmsnorm) with a statistics output the graph reads: refused (a mean of the input
    changes with its rotation; the mean and inverse-std outputs are refused alike)."""
    import onnx_ir as ir

    from normopt.passes.base import Options
    from normopt.passes.pipeline import run_pipeline
    from normopt.passes.rotate_stream import RotateStream
    from tests.helpers import annotate

    model = ir.load(str(corpus("gpt2fused-ts17").model))
    run_pipeline(model, ["preln-to-rmsnorm"], Options())
    skip = next(n for n in model.graph if n.op_type == "SkipSimplifiedLayerNormalization")
    if len(skip.outputs) < 3:
        skip.resize_outputs(3)
    skip.outputs[2].name = "inv_std"
    model.graph.outputs.append(skip.outputs[2])
    annotate(model)
    plan = RotateStream().plan(model)
    assert not plan.applies and "outputs its statistics" in plan.why_not()


def test_a_stream_carried_through_a_token_gather_is_rotated_once(tmp_path):
    """Between two blocks the stream passes a Gather of its tokens (reversed), which starts a
    new stream value for the analysis; rotate-stream once walked that value's writers, found no
    back rule for the Gather and rotated it online: a second time (10.2 off at scale 8.7, which
    only the output check caught). A value the stream carries is rotated with it."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((VOCAB, D)).astype(np.float32), "table"),
        numpy_helper.from_array(np.array([3, 2, 1, 0], np.int64), "perm"),
        numpy_helper.from_array(rng.standard_normal((D, VOCAB)).astype(np.float32), "head"),
    ]
    nodes, x = [helper.make_node("Gather", ["table", "ids"], ["x0"])], "x0"
    for i in range(2):
        inits.append(
            numpy_helper.from_array(rng.standard_normal((D, D)).astype(np.float32), f"W{i}")
        )
        y = _rms(nodes, inits, x, f"ln{i}", np.ones(D, np.float32))
        nodes.append(helper.make_node("MatMul", [y, f"W{i}"], [f"b{i}"]))
        nodes.append(helper.make_node("Add", [x, f"b{i}"], [f"s{i}"]))
        x = f"s{i}"
        if i == 0:
            nodes.append(helper.make_node("Gather", [x, "perm"], ["g0"], axis=1))
            x = "g0"
    nodes.append(
        helper.make_node(
            "MatMul", [_rms(nodes, inits, x, "lnf", np.ones(D, np.float32)), "head"], ["y"]
        )
    )
    graph = helper.make_graph(
        nodes,
        "gathered",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, VOCAB])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    src, out = save(model, tmp_path / "a.onnx"), tmp_path / "b.onnx"
    report = _rotate(src, out)
    assert not any("inserted x Q" in line for line in _lines(report))
    _equal(src, out, _feeds())
