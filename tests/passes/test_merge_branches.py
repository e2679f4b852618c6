"""merge-branches: parallel Conv branches of one input (RepVGG, ACNet) with identity and BN
branches become one Conv, exactly; every mismatch is refused with its reason."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper

from normopt.passes.merge_branches import MergeBranches
from normopt.passes.pipeline import run_pipeline
from tests.helpers import const, make_model, ort_run, run_pass, tensor

rng = np.random.default_rng(0)


def conv(name: str, k: tuple[int, int], pads, cin=8, cout=8, group=1, stride=1, dilation=1, bias=True):
    inits = [const(f"{name}_w", rng.standard_normal((cout, cin // group, *k)).astype(np.float32))]
    if bias:
        inits.append(const(f"{name}_b", rng.standard_normal(cout).astype(np.float32)))
    node = helper.make_node("Conv", ["x", *(i.name for i in inits)], [name], name=name, pads=list(pads), group=group,
                            strides=[stride, stride], dilations=[dilation, dilation], kernel_shape=list(k))
    return node, inits


def bn_of_x(name="bn", c=8):
    inits = [const(f"{name}_{k}", v.astype(np.float32)) for k, v in
             (("g", rng.uniform(0.5, 1.5, c)), ("b", rng.standard_normal(c)), ("m", rng.standard_normal(c)),
              ("v", rng.uniform(0.5, 1.5, c)))]
    return helper.make_node("BatchNormalization", ["x", *(i.name for i in inits)], [name], name=name), inits


def summed(branches, extra_inits=(), cin=8, hw=6, out_shape=(2, 8, 6, 6), sum_op=False):
    """x [2, cin, hw, hw]; the branches' outputs (names) summed by a chain of Adds (or one Sum), then Relu."""
    nodes, inits, names = [], list(extra_inits), []
    for item in branches:
        if isinstance(item, str):
            names.append(item)
        else:
            made, more = item
            made = made if isinstance(made, list) else [made]
            nodes += made
            inits += more
            names.append(made[-1].output[0])
    if sum_op:
        nodes.append(helper.make_node("Sum", names, ["s"], name="sum"))
    else:
        acc = names[0]
        for i, n in enumerate(names[1:]):
            nodes.append(helper.make_node("Add", [acc, n], [f"s{i}"], name=f"add{i}"))
            acc = f"s{i}"
        nodes.append(helper.make_node("Identity", [acc], ["s"], name="id"))
    nodes.append(helper.make_node("Relu", ["s"], ["y"], name="relu"))
    model = make_model(nodes, [tensor("x", shape=(2, cin, hw, hw))], [tensor("y", shape=out_shape)], inits)
    return model, {"x": rng.standard_normal((2, cin, hw, hw)).astype(np.float32)}


def merge(model, expect_modified=True):
    return run_pass(MergeBranches(), model, expect_modified)


CASES = {
    "repvgg": lambda: summed([conv("c3", (3, 3), [1, 1, 1, 1]), conv("c1", (1, 1), [0, 0, 0, 0]), bn_of_x()]),
    "repvgg, plain identity, Sum": lambda: summed([conv("c3", (3, 3), [1, 1, 1, 1]), conv("c1", (1, 1), [0, 0, 0, 0]), "x"],
                                                  sum_op=True),
    "acnet": lambda: summed([conv("c3", (3, 3), [1, 1, 1, 1]), conv("h", (1, 3), [0, 1, 0, 1]),
                             conv("v", (3, 1), [1, 0, 1, 0], bias=False)]),
    "1x3 + 3x1 (no 3x3 among them)": lambda: summed([conv("h", (1, 3), [0, 1, 0, 1]), conv("v", (3, 1), [1, 0, 1, 0]), "x"]),
    "grouped": lambda: summed([conv("c3", (3, 3), [1, 1, 1, 1], group=2), conv("c1", (1, 1), [0, 0, 0, 0], group=2),
                               bn_of_x()]),
    "depthwise": lambda: summed([conv("c5", (5, 5), [2, 2, 2, 2], group=8), conv("c3", (3, 3), [1, 1, 1, 1], group=8), "x"]),
    "strided, no identity": lambda: summed([conv("c3", (3, 3), [1, 1, 1, 1], stride=2), conv("c1", (1, 1), [0, 0, 0, 0], stride=2)],
                                           out_shape=(2, 8, 3, 3)),
    "dilated": lambda: summed([conv("c3", (3, 3), [2, 2, 2, 2], dilation=2), conv("c1", (1, 1), [0, 0, 0, 0], dilation=2), "x"]),
}


@pytest.mark.parametrize("case", CASES)
def test_the_branches_become_one_conv(case):
    model, feeds = CASES[case]()
    result, out = merge(model)
    ops = [n.op_type for n in out.graph.node]
    assert ops.count("Conv") == 1 and "BatchNormalization" not in ops and "Add" not in ops and "Sum" not in ops
    before, after = ort_run(model, feeds)["y"], ort_run(out, feeds)["y"]
    np.testing.assert_allclose(after, before, rtol=0, atol=2e-5 * np.abs(before).max())
    assert result.changes[0].kind == "merged"
    assert not merge(out, expect_modified=False)[0].modified


def test_the_default_pipeline_folds_each_conv_s_bn_then_merges():
    """RepVGG's training form: Conv+BN, Conv+BN and BN(x), summed."""
    branches = []
    for name, k, pads in (("c3", (3, 3), [1, 1, 1, 1]), ("c1", (1, 1), [0, 0, 0, 0])):
        node, inits = conv(name, k, pads, bias=False)
        bn, more = bn_of_x(f"{name}_bn")
        bn.input[0] = name
        branches.append(([node, bn], inits + more))
    model, feeds = summed([*branches, bn_of_x()])
    ir_model = ir.serde.deserialize_model(model)
    results = run_pipeline(ir_model, ["fold-affine-norms", "merge-branches"])
    out = ir.serde.serialize_model(ir_model)
    assert [n.op_type for n in out.graph.node] == ["Conv", "Identity", "Relu"], [r.lines for r in results]
    np.testing.assert_allclose(ort_run(out, feeds)["y"], ort_run(model, feeds)["y"], rtol=0, atol=2e-5 * 10)


def refusal(model) -> str:
    result, _ = merge(model, expect_modified=False)
    return result.refusals[0].reason


def test_mismatches_are_refused_with_their_reason():
    assert refusal(summed([conv("a", (3, 3), [1, 1, 1, 1], stride=2), conv("b", (4, 4), [0, 0, 0, 0])],
                          out_shape=(2, 8, 3, 3))[0]).startswith("the Convs differ in strides")
    assert refusal(summed([conv("a", (3, 3), [2, 2, 2, 2], dilation=2), conv("b", (3, 3), [1, 1, 1, 1])])[0]).startswith(
        "the Convs differ in dilations")
    assert refusal(summed([conv("a", (3, 3), [1, 1, 1, 1], group=2), conv("b", (1, 1), [0, 0, 0, 0])])[0]).startswith(
        "the Convs differ in group")
    assert ("Conv b's pads [2, 2, 0, 0] put its [3, 3] window at pads [2, 2, 0, 0], a's at [1, 1, 1, 1]: the "
            "branches read different windows") in refusal(summed([conv("a", (3, 3), [1, 1, 1, 1]), conv("b", (3, 3), [2, 2, 0, 0])])[0])
    assert "does not centre in [3, 3]" in refusal(
        summed([conv("a", (3, 3), [1, 1, 1, 1]), conv("b", (2, 2), [0, 0, 1, 1])])[0])
    wide = summed([conv("a", (3, 3), [1, 1, 1, 1], cin=1, cout=8), "x"], cin=1)[0]  # x broadcasts over channels
    assert refusal(wide) == "the identity branch 'x' keeps 1 channels, the Convs give 8"


def test_a_branch_read_elsewhere_is_refused():
    model, _ = summed([conv("a", (3, 3), [1, 1, 1, 1]), conv("b", (1, 1), [0, 0, 0, 0])])
    model.graph.output.append(tensor("b", shape=(2, 8, 6, 6)))
    assert refusal(model) == "the branch 'b' is read elsewhere too"


def test_a_residual_add_is_no_candidate():
    """ResNet: Add(conv(h), x) reads two inputs: not parallel branches, no refusal either."""
    node, inits = conv("a", (3, 3), [1, 1, 1, 1])
    node.input[0] = "h"
    model = make_model([helper.make_node("Relu", ["x"], ["h"], name="r0"), node,
                        helper.make_node("Add", ["a", "x"], ["y"], name="add")],
                       [tensor("x", shape=(2, 8, 6, 6))], [tensor("y", shape=(2, 8, 6, 6))], inits)
    result, _ = merge(model, expect_modified=False)
    assert [r.reason for r in result.refusals] == ["no sum of parallel Conv branches of one input"]


@pytest.mark.parametrize("name", ["repvgg-ts14", "repvgg-ts17", "repvgg-dyn18"])
def test_timm_repvgg_becomes_one_conv_per_block(corpus, tmp_path, name):
    """timm's RepVGG in its training form (BN kept): the default pipeline folds each branch's BN,
    then merges the 3x3, 1x1 and identity-BN branches of every block into one 3x3 Conv."""
    from normopt.rewrite import rewrite
    from normopt.verify import VerifyOptions
    from tests.helpers import assert_matches_reference

    paths = corpus(name)
    out = tmp_path / "out.onnx"
    report = rewrite(paths.model, out, verification=VerifyOptions(inputs=paths.load_inputs()))
    ops = collections.Counter(n.op_type for n in onnx.load(out).graph.node)
    blocks = collections.Counter(n.op_type for n in onnx.load(paths.model).graph.node)["Relu"]  # one per block
    assert ops["BatchNormalization"] == 0 and ops["Conv"] == blocks == 8 and ops["Add"] == 0
    merged = next(p for p in report.passes if p.name == "merge-branches")
    assert merged.lines == ["merged 8 parallel branches into one Conv"]
    assert_matches_reference(out, paths)


def test_auto_pad_and_an_identity_beside_strided_convs_are_refused():
    model, _ = summed([conv("a", (3, 3), [1, 1, 1, 1]), conv("b", (1, 1), [0, 0, 0, 0])])
    a = model.graph.node[0]
    del a.attribute[[at.name for at in a.attribute].index("pads")]
    a.attribute.append(helper.make_attribute("auto_pad", "SAME_UPPER"))
    assert refusal(model) == "Conv a pads by auto_pad, not explicitly"
    strided = summed([conv("a", (3, 3), [1, 1, 1, 1], stride=2), conv("b", (1, 1), [0, 0, 0, 0], stride=2), "x"],
                     hw=1, out_shape=(2, 8, 1, 1))[0]  # 1x1 images: stride 2 keeps the size, the sum is valid
    result, out = merge(strided)  # the inner sum of the two Convs still merges; the identity stays added
    assert [r.reason for r in result.refusals] == ["the identity branch 'x' needs stride 1, the Convs have [2, 2]"]
    assert [n.op_type for n in out.graph.node] == ["Conv", "Add", "Identity", "Relu"]
