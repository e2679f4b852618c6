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


def conv(
    name: str, k: tuple[int, int], pads, cin=8, cout=8, group=1, stride=1, dilation=1, bias=True
):
    inits = [const(f"{name}_w", rng.standard_normal((cout, cin // group, *k)).astype(np.float32))]
    if bias:
        inits.append(const(f"{name}_b", rng.standard_normal(cout).astype(np.float32)))
    node = helper.make_node(
        "Conv",
        ["x", *(i.name for i in inits)],
        [name],
        name=name,
        pads=list(pads),
        group=group,
        strides=[stride, stride],
        dilations=[dilation, dilation],
        kernel_shape=list(k),
    )
    return node, inits


def bn_of_x(name="bn", c=8):
    inits = [
        const(f"{name}_{k}", v.astype(np.float32))
        for k, v in (
            ("g", rng.uniform(0.5, 1.5, c)),
            ("b", rng.standard_normal(c)),
            ("m", rng.standard_normal(c)),
            ("v", rng.uniform(0.5, 1.5, c)),
        )
    ]
    return helper.make_node(
        "BatchNormalization", ["x", *(i.name for i in inits)], [name], name=name
    ), inits


def summed(branches, extra_inits=(), cin=8, hw=6, out_shape=(2, 8, 6, 6), sum_op=False):
    """x [2, cin, hw, hw]; the branches' outputs (names) summed by a chain of Adds (or one Sum),
    then Relu."""
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
    model = make_model(
        nodes, [tensor("x", shape=(2, cin, hw, hw))], [tensor("y", shape=out_shape)], inits
    )
    return model, {"x": rng.standard_normal((2, cin, hw, hw)).astype(np.float32)}


def merge(model, expect_modified=True):
    return run_pass(MergeBranches(), model, expect_modified)


CASES = {
    "repvgg": lambda: summed(
        [conv("c3", (3, 3), [1, 1, 1, 1]), conv("c1", (1, 1), [0, 0, 0, 0]), bn_of_x()]
    ),
    "repvgg, plain identity, Sum": lambda: summed(
        [conv("c3", (3, 3), [1, 1, 1, 1]), conv("c1", (1, 1), [0, 0, 0, 0]), "x"], sum_op=True
    ),
    "acnet": lambda: summed(
        [
            conv("c3", (3, 3), [1, 1, 1, 1]),
            conv("h", (1, 3), [0, 1, 0, 1]),
            conv("v", (3, 1), [1, 0, 1, 0], bias=False),
        ]
    ),
    "1x3 + 3x1 (no 3x3 among them)": lambda: summed(
        [conv("h", (1, 3), [0, 1, 0, 1]), conv("v", (3, 1), [1, 0, 1, 0]), "x"]
    ),
    "grouped": lambda: summed(
        [
            conv("c3", (3, 3), [1, 1, 1, 1], group=2),
            conv("c1", (1, 1), [0, 0, 0, 0], group=2),
            bn_of_x(),
        ]
    ),
    "depthwise": lambda: summed(
        [conv("c5", (5, 5), [2, 2, 2, 2], group=8), conv("c3", (3, 3), [1, 1, 1, 1], group=8), "x"]
    ),
    "strided, no identity": lambda: summed(
        [conv("c3", (3, 3), [1, 1, 1, 1], stride=2), conv("c1", (1, 1), [0, 0, 0, 0], stride=2)],
        out_shape=(2, 8, 3, 3),
    ),
    # TorchScript's MobileOne / FastViT: the sum starts at 0.0 (found from outside: the block
    # stayed, with no refusal); a [1, 1, 1, 1] zero broadcasts without adding axes too
    "MobileOne, the sum starts at a scalar 0": lambda: summed(
        ["zero", conv("c3", (3, 3), [1, 1, 1, 1]), conv("c1", (1, 1), [0, 0, 0, 0]), bn_of_x()],
        extra_inits=[const("zero", np.array(0.0, np.float32))],
    ),
    "a [1, 1, 1, 1] zero among the branches": lambda: summed(
        [conv("c3", (3, 3), [1, 1, 1, 1]), "zero", conv("c1", (1, 1), [0, 0, 0, 0]), "x"],
        extra_inits=[const("zero", np.zeros((1, 1, 1, 1), np.float32))],
    ),
    "dilated": lambda: summed(
        [
            conv("c3", (3, 3), [2, 2, 2, 2], dilation=2),
            conv("c1", (1, 1), [0, 0, 0, 0], dilation=2),
            "x",
        ]
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_the_branches_become_one_conv(case):
    model, feeds = CASES[case]()
    result, out = merge(model)
    ops = [n.op_type for n in out.graph.node]
    assert (
        ops.count("Conv") == 1
        and "BatchNormalization" not in ops
        and "Add" not in ops
        and "Sum" not in ops
    )
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
    assert [n.op_type for n in out.graph.node] == ["Conv", "Identity", "Relu"], [
        r.lines for r in results
    ]
    np.testing.assert_allclose(
        ort_run(out, feeds)["y"], ort_run(model, feeds)["y"], rtol=0, atol=2e-5 * 10
    )


def refusal(model) -> str:
    result, _ = merge(model, expect_modified=False)
    return result.refusals[0].reason


def test_mismatches_are_refused_with_their_reason():
    assert refusal(
        summed(
            [conv("a", (3, 3), [1, 1, 1, 1], stride=2), conv("b", (4, 4), [0, 0, 0, 0])],
            out_shape=(2, 8, 3, 3),
        )[0]
    ).startswith("the Convs differ in strides")
    assert refusal(
        summed([conv("a", (3, 3), [2, 2, 2, 2], dilation=2), conv("b", (3, 3), [1, 1, 1, 1])])[0]
    ).startswith("the Convs differ in dilations")
    assert refusal(
        summed([conv("a", (3, 3), [1, 1, 1, 1], group=2), conv("b", (1, 1), [0, 0, 0, 0])])[0]
    ).startswith("the Convs differ in group")
    assert (
        "Conv b's pads [2, 2, 0, 0] put its [3, 3] window at pads [2, 2, 0, 0], a's at [1, 1, 1, "
        "1]: the "
        "branches read different windows"
    ) in refusal(summed([conv("a", (3, 3), [1, 1, 1, 1]), conv("b", (3, 3), [2, 2, 0, 0])])[0])
    assert "does not centre in [3, 3]" in refusal(
        summed([conv("a", (3, 3), [1, 1, 1, 1]), conv("b", (2, 2), [0, 0, 1, 1])])[0]
    )
    wide = summed([conv("a", (3, 3), [1, 1, 1, 1], cin=1, cout=8), "x"], cin=1)[
        0
    ]  # x broadcasts over channels
    assert refusal(wide) == (
        "the sum broadcasts an operand along axis 1 ([2, 8, 6, 6], [2, 1, 6, 6])"
    )


def test_a_branch_read_elsewhere_is_refused():
    model, _ = summed([conv("a", (3, 3), [1, 1, 1, 1]), conv("b", (1, 1), [0, 0, 0, 0])])
    model.graph.output.append(tensor("b", shape=(2, 8, 6, 6)))
    assert refusal(model) == "the branch 'b' is read elsewhere too"


def test_a_residual_add_is_no_candidate():
    """ResNet: Add(conv(h), x) reads two inputs: not parallel branches, no refusal either."""
    node, inits = conv("a", (3, 3), [1, 1, 1, 1])
    node.input[0] = "h"
    model = make_model(
        [
            helper.make_node("Relu", ["x"], ["h"], name="r0"),
            node,
            helper.make_node("Add", ["a", "x"], ["y"], name="add"),
        ],
        [tensor("x", shape=(2, 8, 6, 6))],
        [tensor("y", shape=(2, 8, 6, 6))],
        inits,
    )
    result, _ = merge(model, expect_modified=False)
    assert [r.reason for r in result.refusals] == [
        "no sum of parallel Conv branches of one input, no kernel computed in the graph"
    ]


@pytest.mark.parametrize(
    "name",
    ["repvgg-ts14", "repvgg-ts17", "repvgg-dyn18", "repvgg-folded-ts17", "repvgg-folded-dyn18"],
)
def test_timm_repvgg_becomes_one_conv_per_block(corpus, tmp_path, name):
    """timm's RepVGG in its training form (BN kept, or Conv+BN folded by the exporter): the
    default pipeline folds each branch's BN, then merges the 3x3, 1x1 and identity-BN branches of
    every block into one 3x3 Conv."""
    from normopt.verification import VerifyOptions
    from tests.helpers import assert_matches_reference, rewrite_file

    paths = corpus(name)
    out = tmp_path / "out.onnx"
    report = rewrite_file(paths.model, out, checks=VerifyOptions(inputs=paths.load_inputs()))
    ops = collections.Counter(n.op_type for n in onnx.load(out).graph.node)
    blocks = collections.Counter(n.op_type for n in onnx.load(paths.model).graph.node)[
        "Relu"
    ]  # one per block
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
    strided = summed(
        [conv("a", (3, 3), [1, 1, 1, 1], stride=2), conv("b", (1, 1), [0, 0, 0, 0], stride=2), "x"],
        hw=1,
        out_shape=(2, 8, 1, 1),
    )[0]  # 1x1 images: stride 2 keeps the size, the sum is valid
    result, out = merge(
        strided
    )  # the inner sum of the two Convs still merges; the identity stays added
    assert [r.reason for r in result.refusals] == [
        "the identity branch 'x' needs stride 1, the Convs have [2, 2]"
    ]
    assert [n.op_type for n in out.graph.node] == ["Conv", "Add", "Identity", "Relu"]


def conv_of(source: str, name: str, k, pads, cin=8, cout=8, bias=True, group=1):
    node, inits = conv(name, k, pads, cin=cin, cout=cout, bias=bias, group=group)
    node.input[0] = source
    return node, inits


def shifted_pad(source: str, name: str, values: np.ndarray, p=1):
    """DBB's BN-and-pad: pad(y - v) + v, v per channel."""
    v = const(f"{name}_v", values.reshape(1, -1, 1, 1).astype(np.float32))
    pads = const(f"{name}_pads", np.array([0, 0, p, p, 0, 0, p, p], np.int64))
    nodes = [
        helper.make_node("Sub", [source, v.name], [f"{name}_s"], name=f"{name}_sub"),
        helper.make_node("Pad", [f"{name}_s", pads.name], [f"{name}_p"], name=f"{name}_pad"),
        helper.make_node("Add", [f"{name}_p", v.name], [name], name=f"{name}_add"),
    ]
    return nodes, [v, pads]


def chain(*parts):
    nodes, inits = [], []
    for made, more in parts:
        nodes += made if isinstance(made, list) else [made]
        inits += more
    return nodes, inits


def dbb_one_kxk(bias_value=None):
    """1x1 Conv (bias b1) -> pad with b1 -> 3x3 Conv without pads: DBB's sequential branch."""
    first, inits = conv_of("x", "c1", (1, 1), [0, 0, 0, 0])
    b1 = next(numpy_helper_to_array(i) for i in inits if i.name == "c1_b")
    return chain(
        (first, inits),
        shifted_pad("c1", "bp", b1 if bias_value is None else bias_value),
        conv_of("bp", "ck", (3, 3), [0, 0, 0, 0]),
    )


def numpy_helper_to_array(init):
    return onnx.numpy_helper.to_array(init)


def avg_branch():
    """1x1 Conv -> pad with its bias -> 3x3 AveragePool -> BN: DBB's pooling branch."""
    first, inits = conv_of("x", "a1", (1, 1), [0, 0, 0, 0])
    b1 = next(numpy_helper_to_array(i) for i in inits if i.name == "a1_b")
    pool = helper.make_node("AveragePool", ["ap"], ["pool"], name="pool", kernel_shape=[3, 3])
    bn, more = bn_of_x("pool_bn")
    bn.input[0] = "pool"
    return chain((first, inits), shifted_pad("a1", "ap", b1), (pool, []), (bn, more))


SEQUENTIAL = {
    "DBB: 3x3 + 1x1 -> pad(b1) -> 3x3 + 1x1 -> pad -> avg-pool -> BN + identity BN": lambda: summed(
        [conv("c3", (3, 3), [1, 1, 1, 1]), dbb_one_kxk(), avg_branch(), bn_of_x()]
    ),
    "1x1 without bias -> 3x3 zero-padded": lambda: summed(
        [
            conv("c3", (3, 3), [1, 1, 1, 1]),
            chain(
                conv_of("x", "u", (1, 1), [0, 0, 0, 0], bias=False),
                conv_of("u", "k", (3, 3), [1, 1, 1, 1]),
            ),
        ]
    ),
    "3x3 -> 1x1": lambda: summed(
        [
            conv("c3", (3, 3), [1, 1, 1, 1]),
            chain(conv_of("x", "k", (3, 3), [1, 1, 1, 1]), conv_of("k", "u", (1, 1), [0, 0, 0, 0])),
        ]
    ),
    "average pool of x beside a depthwise 3x3": lambda: summed(
        [
            conv("dw", (3, 3), [1, 1, 1, 1], group=8),
            (
                helper.make_node(
                    "AveragePool",
                    ["x"],
                    ["pool"],
                    name="pool",
                    kernel_shape=[3, 3],
                    pads=[1, 1, 1, 1],
                    count_include_pad=1,
                ),
                [],
            ),
        ]
    ),
}


@pytest.mark.parametrize("case", SEQUENTIAL)
def test_sequential_branches_merge_too(case):
    model, feeds = SEQUENTIAL[case]()
    result, out = merge(model)
    ops = [n.op_type for n in out.graph.node]
    assert ops.count("Conv") == 1 and not {"BatchNormalization", "AveragePool", "Pad", "Add"} & set(
        ops
    ), ops
    before, after = ort_run(model, feeds)["y"], ort_run(out, feeds)["y"]
    np.testing.assert_allclose(after, before, rtol=0, atol=2e-5 * np.abs(before).max())


def test_a_padding_that_is_not_the_lower_stages_value_for_zero_is_refused():
    """A 1x1 Conv with a bias, then a zero-padded 3x3: the border sees 0, not b1; one Conv of the
    zero-padded input would see b1 there."""
    branch = chain(conv_of("x", "u", (1, 1), [0, 0, 0, 0]), conv_of("u", "k", (3, 3), [1, 1, 1, 1]))
    reason = refusal(summed([conv("c3", (3, 3), [1, 1, 1, 1]), branch])[0])
    assert (
        reason.startswith("Conv k pads with 0 where the stages before it give [")
        and "for a zero input" in reason
    )
    assert refusal(
        summed([conv("c3", (3, 3), [1, 1, 1, 1]), dbb_one_kxk(bias_value=np.ones(8))])[0]
    ).startswith("Conv ck pads with 1 where the stages before it give [")


def test_sequences_that_are_no_convolution_are_refused():
    two = chain(conv_of("x", "k1", (3, 3), [1, 1, 1, 1]), conv_of("k1", "k2", (3, 3), [1, 1, 1, 1]))
    assert refusal(summed([conv("c3", (3, 3), [1, 1, 1, 1]), two])[0]) == (
        "Conv k2 reads a [3, 3] Conv's output: one of two Convs in sequence must be 1x1"
    )
    pool = helper.make_node(
        "AveragePool", ["x"], ["pool"], name="pool", kernel_shape=[3, 3], pads=[1, 1, 1, 1]
    )
    assert refusal(summed([conv("dw", (3, 3), [1, 1, 1, 1], group=8), (pool, [])])[0]) == (
        "AveragePool pool leaves its padding out of the count (count_include_pad=0): not a "
        "convolution"
    )


def test_a_kernel_computed_in_the_graph_becomes_a_constant():
    """DEConv: the kernel is a sum of kernels computed from weights in forward."""
    w1, w2 = (const(n, rng.standard_normal((8, 8, 3, 3)).astype(np.float32)) for n in ("w1", "w2"))
    nodes = [
        helper.make_node("Neg", ["w2"], ["w2n"], name="neg"),
        helper.make_node("Add", ["w1", "w2n"], ["w"], name="sum"),
        helper.make_node("Conv", ["x", "w"], ["y"], name="deconv", pads=[1, 1, 1, 1]),
    ]
    model = make_model(
        nodes, [tensor("x", shape=(2, 8, 6, 6))], [tensor("y", shape=(2, 8, 6, 6))], [w1, w2]
    )
    feeds = {"x": rng.standard_normal((2, 8, 6, 6)).astype(np.float32)}
    result, out = merge(model)
    assert [c.kind for c in result.changes] == ["folded"]
    assert [n.op_type for n in out.graph.node if n.name != "neg" and n.name != "sum"] == ["Conv"]
    np.testing.assert_array_equal(ort_run(out, feeds)["y"], ort_run(model, feeds)["y"])


@pytest.mark.parametrize("name", ["repblocks-ts14", "repblocks-ts17", "repblocks-dyn18"])
def test_acnet_dbb_and_deconv_blocks_become_one_conv_each(corpus, tmp_path, name):
    """The ACNet block, the Diverse Branch Block (all four branches) and DEA-Net's DEConv in their
    training form: one Conv per block after the default pipeline, nothing else of them left."""
    from normopt.verification import VerifyOptions
    from tests.helpers import assert_matches_reference, rewrite_file

    paths = corpus(name)
    out = tmp_path / "out.onnx"
    rewrite_file(paths.model, out, checks=VerifyOptions(inputs=paths.load_inputs()))
    ops = collections.Counter(n.op_type for n in onnx.load(out).graph.node)
    assert ops["Conv"] == 4  # the stem and one per block
    assert not {
        "BatchNormalization",
        "Pad",
        "AveragePool",
        "Add",
        "Sub",
        "ScatterND",
        "Concat",
    } & set(ops), ops
    assert_matches_reference(out, paths)


def test_dbb_padding_by_slice_assignment_is_left_and_the_rest_merges(tmp_path):
    """DBB as its own code writes BN-and-pad (slice assignment, exported as shape-dependent
    ScatterND chains): not proven a constant pad, so its two sequential branches stay; the kxk
    and 1x1 branches still merge, and the rewrite equals the original."""
    torch = pytest.importorskip("torch")
    from models.common import Built, export, randomize_norms_and_biases
    from models.reparam import DiverseBranchBlock
    from normopt.verification import VerifyOptions
    from tests.helpers import rewrite_file

    block = DiverseBranchBlock(4, slice_assign=True).eval()
    randomize_norms_and_biases(block, seed=1)
    x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    src = tmp_path / "dbb.onnx"
    export(Built(block, {"x": x}, ["y"], keep_bn=True), src, exporter="ts", opset=17)
    out = tmp_path / "out.onnx"
    report = rewrite_file(src, out, checks=VerifyOptions(inputs={"x": x.numpy()}))
    merged = next(p for p in report.passes if p.name == "merge-branches")
    assert report.verification.ok and merged.lines[0] == "merged 1 parallel branches into one Conv"
    ops = collections.Counter(n.op_type for n in onnx.load(out).graph.node)
    assert (
        ops["ScatterND"] and ops["Conv"] == 4
    )  # merged kxk+1x1, the pool branch's 1x1, the 1x1 -> kxk pair


def test_an_identity_between_the_taps_of_an_even_dilated_kernel_is_refused():
    """Found from outside: kernel 2, dilation 2, pads 1 reads x-1 and x+1; an identity branch
    beside it falls between the taps, and was added to the first tap (wrong before the gate).
    Kernel 4, dilation 2 (pads 3) was exit 4."""
    for k, pad in ((2, 1), (4, 3)):
        model, _ = summed([conv("c", (k, k), [pad] * 4, dilation=2), "x"])
        result, _ = merge(model, expect_modified=False)
        assert "the identity branch 'x' needs 'same' pads" in result.refusals[0].reason


def test_operands_summed_twice_or_broadcast_are_refused():
    """Found from outside: Add(y, y) was exit 4; a [C, 1, 1] branch (a Conv as wide as the map)
    added to [C, H, W] was merged into one Conv of the wrong shape (wrong before the gate)."""
    node, inits = conv("c", (3, 3), [1, 1, 1, 1])
    twice = make_model(
        [node, helper.make_node("Add", ["c", "c"], ["y"], name="add")],
        [tensor("x", shape=(2, 8, 6, 6))],
        [tensor("y", shape=(2, 8, 6, 6))],
        inits,
    )
    result, _ = merge(twice, expect_modified=False)
    assert result.refusals[0].reason == "'c' is summed more than once"
    whole = summed([conv("a", (3, 3), [1, 1, 1, 1]), conv("b", (6, 6), [0, 0, 0, 0])])[0]
    result, _ = merge(whole, expect_modified=False)
    assert "broadcasts an operand along axis 2" in result.refusals[0].reason


@pytest.mark.parametrize("name", ["mobileone-ts17", "mobileone-dyn18"])
def test_timm_mobileone_becomes_one_conv_per_block(corpus, tmp_path, name):
    """Found from outside: TorchScript's MobileOne starts each block's sum at 0.0, and
    merge-branches left those blocks (110 Adds, 18 BatchNorms stayed) with no refusal, while the
    dynamo export merged. Both exports now end as one Conv per block (43, one per Relu)."""
    from normopt.verification import VerifyOptions
    from tests.helpers import assert_matches_reference, rewrite_file

    paths = corpus(name)
    out = tmp_path / "out.onnx"
    rewrite_file(paths.model, out, checks=VerifyOptions(inputs=paths.load_inputs()))
    ops = collections.Counter(n.op_type for n in onnx.load(out).graph.node)
    blocks = collections.Counter(n.op_type for n in onnx.load(paths.model).graph.node)["Relu"]
    assert ops["BatchNormalization"] == 0 and ops["Add"] == 0 and ops["Conv"] == blocks == 43
    assert_matches_reference(out, paths)
