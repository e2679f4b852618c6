"""`normopt recalibrate`: BatchNorm statistics re-estimated from calibration data match
PyTorch's own (train mode, momentum=None: torch.optim.swa_utils.update_bn); bad data is one
line and exit 2; IN is never written."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from normopt.calibration import Moments
from tests.helpers import const, make_model, save, tensor
from tests.test_cli import assert_one_line_error, run
from tests.test_schema import VALIDATOR

rng = np.random.default_rng(0)


def test_moments_give_torch_s_average_and_the_pooled_statistics():
    batches = [
        rng.standard_normal((n, 3)) * [1, 2, 3] + [0, 1, -1] + i for i, n in enumerate((5, 5, 2))
    ]
    moments = Moments()
    for b in batches:
        moments.add(b.mean(0), b.var(0), len(b))
    mean, var = moments.result("torch")
    np.testing.assert_allclose(mean, np.mean([b.mean(0) for b in batches], 0), rtol=1e-12)
    np.testing.assert_allclose(var, np.mean([b.var(0, ddof=1) for b in batches], 0), rtol=1e-12)
    everything = np.concatenate(batches)
    mean, var = moments.result("pooled")
    np.testing.assert_allclose(mean, everything.mean(0), rtol=1e-12)
    np.testing.assert_allclose(var, everything.var(0, ddof=1), rtol=1e-12)


def _torch_reference(family: str, tmp_path, batches):
    """Export `family` (BN kept), and PyTorch's update_bn statistics over `batches`."""
    import torch

    from models import cnn, transformer
    from models.common import export, randomize_norms_and_biases

    torch.manual_seed(0)
    built = {"resnet18": cnn.resnet18, "repbn": transformer.repbn}[family]()
    randomize_norms_and_biases(built.module, seed=1)
    path = tmp_path / "model.onnx"
    export(built, path, exporter="ts", opset=17)
    module = copy.deepcopy(built.module)
    torch.optim.swa_utils.update_bn([torch.from_numpy(b) for b in batches], module)
    expected = {
        k: v.numpy().astype(np.float64)
        for k, v in module.state_dict().items()
        if k.endswith(("running_mean", "running_var"))
    }
    return path, next(iter(built.inputs)), expected


@pytest.mark.slow
@pytest.mark.parametrize("family", ["resnet18", "repbn"])
def test_the_statistics_match_pytorch_s_update_bn(tmp_path, cli_env, family):
    shape = {"resnet18": (3, 64, 64), "repbn": (3, 32, 32)}[family]
    samples = (rng.standard_normal((10, *shape)) * 1.5 + 0.3).astype(np.float32)
    batches = [samples[:4], samples[4:8], samples[8:]]  # the last batch is smaller, as in a loader
    src, name, expected = _torch_reference(family, tmp_path, batches)
    data = tmp_path / "data"
    data.mkdir()
    np.savez(data / "a.npz", **{name: samples[:6]})  # batches cross the files
    np.savez(data / "b.npz", **{name: samples[6:]})
    before = src.read_bytes()
    out = tmp_path / "out.onnx"
    proc = run("recalibrate", src, out, "--data", data, "--batch-size", "4", "--json", env=cli_env)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    VALIDATOR.validate(doc)
    assert (
        doc["data"]["batches"] == 3 and doc["data"]["samples"] == 10 and src.read_bytes() == before
    )
    got = {
        i.name: numpy_helper.to_array(i).astype(np.float64)
        for i in onnx.load(out).graph.initializer
    }
    assert len(expected) >= 4 and set(expected) <= set(got)
    first = next(iter(expected)).rsplit(".", 1)[0]
    for key, reference in expected.items():
        # to 1e-6 of each tensor's scale where the BN's input is computed alike (the first one);
        # deeper, torch's and onnxruntime's float32 convolutions differ by a few 1e-6 by then
        tol = 1e-6 if key.startswith(first + ".") else 2e-5
        np.testing.assert_allclose(
            got[key], reference, rtol=0, atol=tol * np.abs(reference).max(), err_msg=key
        )
    assert [layer["var"] for layer in doc["layers"]] == [
        k for k in expected if k.endswith("running_var")
    ]
    assert doc["drift"][0]["max_abs"] > 0  # the outputs move: that is the point


def bn_model(stats_as_input: bool = False) -> onnx.ModelProto:
    inits = [
        const("w", rng.standard_normal((4, 3, 3, 3)).astype(np.float32)),
        const("g", np.ones(4, np.float32)),
        const("b", np.zeros(4, np.float32)),
        const("v", np.ones(4, np.float32)),
    ]
    inputs = [tensor("x", shape=("n", 3, 8, 8))]
    if stats_as_input:
        inputs.append(tensor("m", shape=(4,)))
    else:
        inits.append(const("m", np.zeros(4, np.float32)))
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"], name="bn"),
    ]
    return make_model(nodes, inputs, [tensor("y", shape=("n", 4, 8, 8))], inits)


@pytest.fixture
def bn_file(tmp_path):
    return save(bn_model(), tmp_path / "m.onnx")


def test_bad_data_is_one_line_and_exit_2(tmp_path, bn_file, cli_env):
    out = tmp_path / "o.onnx"
    cases = {
        "lacks input(s) x": {"image": np.zeros((4, 3, 8, 8), np.float32)},
        "input 'x' is float64, the model expects float32": {"x": np.zeros((4, 3, 8, 8))},
        "input 'x' has shape [4, 3, 9, 8], the model expects ['n', 3, 8, 8]": {
            "x": np.zeros((4, 3, 9, 8), np.float32)
        },
        "holds no samples": {"x": np.zeros((0, 3, 8, 8), np.float32)},
    }
    for message, arrays in cases.items():
        np.savez(tmp_path / "d.npz", **arrays)
        assert_one_line_error(
            run("recalibrate", bn_file, out, "--data", tmp_path / "d.npz", env=cli_env), 2, message
        )
    (tmp_path / "junk.npz").write_text("not an npz")
    assert_one_line_error(
        run("recalibrate", bn_file, out, "--data", tmp_path / "junk.npz", env=cli_env),
        2,
        "cannot read",
    )
    (tmp_path / "empty").mkdir()
    assert_one_line_error(
        run("recalibrate", bn_file, out, "--data", tmp_path / "empty", env=cli_env), 2, "neither"
    )
    assert not out.exists()


def test_statistics_that_are_not_initializers_and_in_place_writes_are_refused(
    tmp_path, bn_file, cli_env
):
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((4, 3, 8, 8)).astype(np.float32))
    computed = save(bn_model(stats_as_input=True), tmp_path / "c.onnx")
    assert_one_line_error(
        run(
            "recalibrate", computed, tmp_path / "o.onnx", "--data", tmp_path / "d.npz", env=cli_env
        ),
        2,
        "its running mean 'm' is not an initializer",
    )
    before = bn_file.read_bytes()
    assert_one_line_error(
        run("recalibrate", bn_file, bn_file, "--data", tmp_path / "d.npz", env=cli_env),
        2,
        "normopt never writes its inputs",
    )
    assert bn_file.read_bytes() == before
    no_bn = save(
        make_model([helper.make_node("Relu", ["x"], ["y"])], [tensor("x")], [tensor("y")]),
        tmp_path / "r.onnx",
    )
    assert_one_line_error(
        run("recalibrate", no_bn, tmp_path / "o.onnx", "--data", tmp_path / "d.npz", env=cli_env),
        2,
        "no BatchNormalization",
    )


def test_a_batch_of_one_value_per_channel_is_refused(tmp_path, cli_env):
    model = bn_model()
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 1
    model.graph.input[0].type.tensor_type.shape.dim[3].dim_value = 1
    model.graph.output[0].type.tensor_type.shape.dim[2].dim_value = 1
    model.graph.output[0].type.tensor_type.shape.dim[3].dim_value = 1
    src = save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=np.ones((3, 3, 1, 1), np.float32))
    assert_one_line_error(
        run(
            "recalibrate",
            src,
            tmp_path / "o.onnx",
            "--data",
            tmp_path / "d.npz",
            "--batch-size",
            "1",
            env=cli_env,
        ),
        2,
        "1 value per channel",
    )


def _stats(path) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(path).graph.initializer}


@pytest.mark.parametrize(
    "case", ["conv+bias", "conv", "gemm transB beta", "token bn", "token bn, no bias"]
)
def test_a_tuned_model_recalibrates_as_its_batchnorm_original(tmp_path, cli_env, case):
    from tests.passes.test_convbn_tune import CASES, tune

    model, feeds = CASES[case]()
    _, tuned = tune(model, "inputs")
    plain, tuned_path = save(model, tmp_path / "plain.onnx"), save(tuned, tmp_path / "tuned.onnx")
    x = feeds["x"]
    np.savez(tmp_path / "d.npz", x=np.concatenate([x * 2 + 1, x - 0.5, x * 0.5]))
    for src, out in ((plain, tmp_path / "p.onnx"), (tuned_path, tmp_path / "t.onnx")):
        proc = run(
            "recalibrate",
            src,
            out,
            "--data",
            tmp_path / "d.npz",
            "--batch-size",
            str(len(x)),
            env=cli_env,
        )
        assert proc.returncode == 0, proc.stderr
    a, b = _stats(tmp_path / "p.onnx"), _stats(tmp_path / "t.onnx")
    for name in ("bn_m", "bn_v"):
        np.testing.assert_allclose(b[name], a[name], rtol=1e-6)
        assert not np.allclose(a[name], _stats(plain)[name])  # they did move
    from tests.helpers import ort_run

    np.testing.assert_allclose(
        ort_run(onnx.load(tmp_path / "t.onnx"), feeds)["y"],
        ort_run(onnx.load(tmp_path / "p.onnx"), feeds)["y"],
        rtol=1e-4,
        atol=1e-4,
    )


def test_a_tune_record_the_graph_no_longer_matches_is_refused(tmp_path, cli_env):
    from tests.passes.test_convbn_tune import conv_bn, tune

    model, feeds = conv_bn()
    _, tuned = tune(model)
    next(n for n in tuned.graph.node if n.op_type == "Conv").name = "renamed"
    src = save(tuned, tmp_path / "t.onnx")
    np.savez(tmp_path / "d.npz", x=feeds["x"])
    assert_one_line_error(
        run("recalibrate", src, tmp_path / "o.onnx", "--data", tmp_path / "d.npz", env=cli_env),
        2,
        "which the graph no longer has as recorded",
    )


def test_a_batchnorm_after_a_tuned_one_recalibrates_on_what_the_tuned_one_gives_it(
    tmp_path, cli_env
):
    from tests.passes.test_convbn_tune import bn_inits, bn_node, conv_bn, tune

    model, feeds = conv_bn()
    model.graph.node[1].output[0] = "y1"
    model.graph.initializer.extend(bn_inits("bn2", 6))
    model.graph.node.append(bn_node("bn2", "y1", "y"))
    _, tuned = tune(model)  # the first BN tuned, the second stays
    plain, tuned_path = save(model, tmp_path / "plain.onnx"), save(tuned, tmp_path / "tuned.onnx")
    x = feeds["x"]
    np.savez(tmp_path / "d.npz", x=np.concatenate([x * 2 + 1, x - 0.5]))
    for src, out in ((plain, tmp_path / "p.onnx"), (tuned_path, tmp_path / "t.onnx")):
        assert (
            run(
                "recalibrate",
                src,
                out,
                "--data",
                tmp_path / "d.npz",
                "--batch-size",
                "2",
                env=cli_env,
            ).returncode
            == 0
        )
    a, b = _stats(tmp_path / "p.onnx"), _stats(tmp_path / "t.onnx")
    for name in ("bn_m", "bn_v", "bn2_m", "bn2_v"):
        np.testing.assert_allclose(b[name], a[name], rtol=1e-6, err_msg=name)


def test_shared_and_training_mode_statistics_are_refused(tmp_path, cli_env):
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((4, 3, 8, 8)).astype(np.float32))
    model = bn_model()
    model.graph.node.append(
        helper.make_node("Add", ["y", "m"], ["z"], name="reads_mean")
    )  # m has a second reader
    model.graph.output[0].name = "z"
    shared = save(model, tmp_path / "s.onnx")
    assert_one_line_error(
        run("recalibrate", shared, tmp_path / "o.onnx", "--data", tmp_path / "d.npz", env=cli_env),
        2,
        "its running mean 'm' is shared with another node",
    )
    model = bn_model()
    model.graph.node[1].attribute.append(helper.make_attribute("training_mode", 1))
    model.graph.node[1].output.extend(["rm", "rv"])
    model.opset_import[0].version = 15
    training = save(model, tmp_path / "t.onnx")
    assert_one_line_error(
        run(
            "recalibrate", training, tmp_path / "o.onnx", "--data", tmp_path / "d.npz", env=cli_env
        ),
        2,
        "BatchNormalization 'bn' runs in training mode",
    )


def _two_unnamed_bns() -> onnx.ModelProto:
    """Conv -> BN -> Conv -> BN, both BatchNorms without a name (or named like the fallback)."""
    inits = [
        const("w1", rng.standard_normal((4, 3, 3, 3)).astype(np.float32)),
        const("w2", rng.standard_normal((4, 4, 3, 3)).astype(np.float32)),
        *(
            const(f"{p}{i}", np.full(4, v, np.float32))
            for i in (1, 2)
            for p, v in zip("gbmv", (1, 0, 0, 1))
        ),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "g1", "b1", "m1", "v1"], ["y1"]),
        helper.make_node("Conv", ["y1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node(
            "BatchNormalization", ["c2", "g2", "b2", "m2", "v2"], ["y"], name="batchnorm"
        ),
    ]
    return make_model(
        nodes, [tensor("x", shape=("n", 3, 8, 8))], [tensor("y", shape=("n", 4, 8, 8))], inits
    )


def test_batchnorms_without_names_keep_their_own_statistics(tmp_path, cli_env):
    """Found from outside: BatchNorms named '' (and one named like the fallback) were merged
    into one site, each getting the other's statistics."""
    src, out = save(_two_unnamed_bns(), tmp_path / "m.onnx"), tmp_path / "o.onnx"
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((8, 3, 8, 8)).astype(np.float32) * 3 + 1)
    proc = run("recalibrate", src, out, "--data", tmp_path / "d.npz", "--json", env=cli_env)
    assert proc.returncode == 0, proc.stderr
    layers = json.loads(proc.stdout)["layers"]
    assert len({layer["name"] for layer in layers}) == 2
    stats = _stats(out)
    assert not np.allclose(stats["m1"], stats["m2"]) and not np.allclose(stats["v1"], stats["v2"])


def test_data_that_is_not_finite_or_not_an_npz_is_refused(tmp_path, bn_file, cli_env):
    out = tmp_path / "o.onnx"
    x = np.ones((4, 3, 8, 8), np.float32)
    x[1, 0, 0, 0] = np.nan
    np.savez(tmp_path / "nan.npz", x=x)
    assert_one_line_error(
        run("recalibrate", bn_file, out, "--data", tmp_path / "nan.npz", env=cli_env),
        2,
        "input 'x' holds 1 NaN or Inf value(s)",
    )
    np.save(tmp_path / "x.npy", np.ones((4, 3, 8, 8), np.float32))
    assert_one_line_error(
        run("recalibrate", bn_file, out, "--data", tmp_path / "x.npy", env=cli_env),
        2,
        "is not an .npz",
    )
    overflowing = bn_model()  # a Conv of ones over 27 taps of 3e38 overflows float32
    overflowing.graph.initializer[0].CopyFrom(const("w", np.ones((4, 3, 3, 3), np.float32)))
    np.savez(tmp_path / "big.npz", x=np.full((4, 3, 8, 8), 3e38, np.float32))
    assert_one_line_error(
        run(
            "recalibrate",
            save(overflowing, tmp_path / "ones.onnx"),
            out,
            "--data",
            tmp_path / "big.npz",
            env=cli_env,
        ),
        2,
        "statistics on the data are not finite",
    )
    assert not out.exists()


def test_a_folder_of_files_with_different_sample_shapes_is_refused(tmp_path, cli_env):
    """Found from outside: a folder of .npz files whose spatial sizes differ was exit 4 (a
    batch concatenated them). One batch takes one sample shape: exit 2 naming the file."""
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"], name="bn"),
    ]
    inits = [
        const("w", rng.standard_normal((4, 3, 3, 3)).astype(np.float32)),
        *(const(n, np.full(4, 1.0 if n in "gv" else 0.0, np.float32)) for n in "gbmv"),
    ]
    model = make_model(
        nodes,
        [tensor("x", shape=("n", 3, "h", "w"))],
        [tensor("y", shape=("n", 4, "h", "w"))],
        inits,
    )
    data = tmp_path / "data"
    data.mkdir()
    np.savez(data / "a.npz", x=np.ones((3, 3, 8, 8), np.float32))
    np.savez(data / "b.npz", x=np.ones((3, 3, 12, 12), np.float32))
    out = tmp_path / "o.onnx"
    proc = run("recalibrate", save(model, tmp_path / "m.onnx"), out, "--data", data, env=cli_env)
    assert_one_line_error(proc, 2, "b.npz': input 'x' holds samples of shape [3, 12, 12]")
    assert not out.exists()


def test_the_statistics_are_checked_against_an_independent_evaluation(tmp_path, monkeypatch):
    """recalibrate's output check: the calibration copy's statistics against onnx's reference
    evaluator running the original graph with a train-mode BatchNorm in float64. A calibration
    copy broken on purpose (its variance off by 1%) is exit 1 with nothing written."""
    import normopt
    from normopt import calibration
    from normopt.errors import VerificationFailed

    src = save(bn_model(), tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((16, 3, 8, 8)).astype(np.float32))
    report = normopt.recalibrate(src, tmp_path / "ok.onnx", tmp_path / "d.npz", batch_size=8)
    assert report.check == "1 BatchNorm(s) checked on 8 sample(s) against float64"

    original = calibration._batch_normalized

    def variance_off_by_one_percent(edit, site, opset):
        nodes, y, (mean, var, size) = original(edit, site, opset)
        k = edit.initializer(f"{site.name}.k", np.array(1.01))
        nodes.append(edit.node("Mul", [var, k], name=f"{site.name}.wrong_var"))
        return nodes, y, [mean, nodes[-1].outputs[0], size]

    monkeypatch.setattr(calibration, "_batch_normalized", variance_off_by_one_percent)
    with pytest.raises(VerificationFailed, match="differ from an independent float64"):
        normopt.recalibrate(src, tmp_path / "bad.onnx", tmp_path / "d.npz", batch_size=8)
    assert not (tmp_path / "bad.onnx").exists()
