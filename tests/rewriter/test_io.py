import hashlib
import os

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from normopt import files
from normopt.errors import BadInput
from normopt.rewriter import io
from normopt.sessions import run_ort
from tests.helpers import mlp, save


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_load_keeps_external_data_memory_mapped(tmp_path):
    path = save(mlp(), tmp_path / "m.onnx", external=True)
    model = io.load(path)
    tensors = [v.const_value for v in model.graph.initializers.values()]
    assert tensors and all(isinstance(t, ir.ExternalTensor) for t in tensors)
    assert all(t.raw is None for t in tensors), "weights were read at load time"
    assert io.uses_external_data(model)


@pytest.mark.parametrize("external", [False, True])
def test_save_round_trip_keeps_storage_kind_and_function(tmp_path, external):
    src = save(mlp(), tmp_path / "m.onnx", external=external)
    model = io.load(src)
    dst = tmp_path / "out" / "r.onnx"
    dst.parent.mkdir()
    files.save(model, dst, external_data=io.uses_external_data(model))
    assert (dst.parent / "r.onnx.data").exists() == external
    assert sorted(os.listdir(dst.parent)) == (["r.onnx", "r.onnx.data"] if external else ["r.onnx"])
    x = {"x": np.ones((3, 8), np.float32)}
    np.testing.assert_array_equal(run_ort(src, x)["y"], run_ort(dst, x)["y"])


def test_large_models_are_written_with_external_data(tmp_path, monkeypatch):
    monkeypatch.setattr(io, "EMBEDDED_LIMIT_BYTES", 100)
    model = io.load(save(mlp(), tmp_path / "m.onnx"))
    files.save(model, tmp_path / "big.onnx", external_data=False)
    assert (tmp_path / "big.onnx.data").exists()


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    model = io.load(save(mlp(), tmp_path / "m.onnx"))

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ir, "save", broken)
    with pytest.raises(BadInput, match="cannot write .*out.onnx': disk full"):  # one line, exit 2
        files.save(model, tmp_path / "out.onnx", external_data=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_discarded_stage_leaves_destination_untouched(tmp_path):
    model = io.load(save(mlp(), tmp_path / "m.onnx"))
    dst = tmp_path / "out.onnx"
    dst.write_bytes(b"previous")
    staged = files.stage(model, dst, external_data=True)
    assert staged.path.exists() and dst.read_bytes() == b"previous"
    staged.discard()
    assert dst.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "out.onnx"]


def test_in_place_save_over_memory_mapped_external_data(tmp_path):
    """Replacing the data file the model is mapped from must not corrupt what gets written."""
    path = save(mlp(), tmp_path / "m.onnx", external=True)
    x = {"x": np.ones((3, 8), np.float32)}
    before = run_ort(path, x)["y"]
    # The helper names the data file m.onnx.data, the name `stage` writes: this really replaces it.
    model = io.load(path)
    files.save(model, path, external_data=True)
    np.testing.assert_array_equal(run_ort(path, x)["y"], before)


BAD = {
    "missing": lambda p: None,
    "directory": lambda p: p.mkdir(),
    "empty": lambda p: p.write_bytes(b""),
    "text": lambda p: p.write_text("this is not an onnx model\n"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_files_raise_one_line(tmp_path, case):
    path = tmp_path / "bad.onnx"
    BAD[case](path)
    with pytest.raises(BadInput) as info:
        io.load(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9, 0.99])
def test_truncated_file(tmp_path, fraction):
    data = onnx.load_model_from_string(mlp().SerializeToString()).SerializeToString()
    path = tmp_path / "t.onnx"
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(
        BadInput, match="not a valid ONNX|not an ONNX model|fails onnx.checker|opset"
    ):
        io.load(path)


def test_missing_external_data_file(tmp_path):
    path = save(mlp(), tmp_path / "m.onnx", external=True)
    (tmp_path / "m.onnx.data").unlink()
    with pytest.raises(BadInput, match="external data file .* missing"):
        io.load(path)


def test_truncated_external_data_file(tmp_path):
    path = save(mlp(), tmp_path / "m.onnx", external=True)
    data = tmp_path / "m.onnx.data"
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(BadInput, match="truncated"):
        io.load(path)


@pytest.mark.parametrize(
    "opset,message",
    [(11, "opset 11.*13-.*convert"), (io.MAX_OPSET + 1, f"opset {io.MAX_OPSET + 1}")],
)
def test_unsupported_opset(tmp_path, opset, message):
    model = mlp()
    model.opset_import[0].version = opset
    path = save(model, tmp_path / "m.onnx")
    with pytest.raises(BadInput, match=message):
        io.load(path)


@pytest.mark.parametrize("version", [3, onnx.IR_VERSION + 1])
def test_unsupported_ir_version(tmp_path, version):
    model = mlp()
    model.ir_version = version
    path = save(model, tmp_path / "m.onnx")
    with pytest.raises(BadInput, match=f"IR version {version}"):
        io.load(path)


def test_checker_invalid_model(tmp_path):
    model = mlp()
    model.graph.node[0].input[0] = "undefined_value"
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(BadInput, match="fails onnx.checker"):
        io.load(path)


def test_load_never_writes_the_input(tmp_path):
    path = save(mlp(), tmp_path / "m.onnx", external=True)
    before = {p.name: digest(p) for p in tmp_path.iterdir()}
    model = io.load(path)
    files.save(model, tmp_path / "o.onnx", external_data=True)
    assert {p.name: digest(p) for p in tmp_path.iterdir() if p.name.startswith("m.")} == before


def test_stage_reports_progress_per_external_tensor(tmp_path):
    model = io.load(save(mlp(d=64), tmp_path / "m.onnx"))
    calls = []
    files.stage(
        model, tmp_path / "o.onnx", external_data=True, progress=lambda i, n: calls.append((i, n))
    ).commit()
    # w1 and w2 (16 KiB each) go external; the 256-byte bias stays under the 1 KiB threshold.
    assert calls == [(1, 2), (2, 2)]


def test_an_embedded_model_written_a_tensor_at_a_time_is_what_onnx_ir_would_write(tmp_path):
    """The streamed save (one `graph` field per initializer, merged by protobuf) must give the
    model proto onnx-ir's own save gives: initializers in order, the ones IN described in
    value_info before the nodes' entries, a subgraph with its own initializer, a model-local
    function, metadata. Compared as parsed protos, and run."""
    from onnx import TensorProto, helper

    proto = mlp(d=64)  # 16 KiB weights
    branch = helper.make_graph(
        [helper.make_node("Add", ["y", "k"], ["z"])],
        "then",
        [],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 64])],
        [onnx.numpy_helper.from_array(np.full(64, 2.0, np.float32), "k")],
    )
    other = helper.make_graph(
        [helper.make_node("Neg", ["y"], ["z2"])],
        "else",
        [],
        [helper.make_tensor_value_info("z2", TensorProto.FLOAT, ["batch", 64])],
    )
    proto.graph.node.append(
        helper.make_node(
            "Constant", [], ["cond"], value=helper.make_tensor("c", TensorProto.BOOL, [], [True])
        )
    )
    proto.graph.node.append(
        helper.make_node("If", ["cond"], ["out"], then_branch=branch, else_branch=other)
    )
    proto.graph.node.append(helper.make_node("Twice", ["out"], ["out2"], domain="local"))
    proto.functions.append(
        helper.make_function(
            "local",
            "Twice",
            ["a"],
            ["b"],
            [helper.make_node("Add", ["a", "a"], ["b"])],
            [helper.make_opsetid("", 17)],
        )
    )
    proto.opset_import.append(helper.make_opsetid("local", 1))
    proto.graph.output.append(
        helper.make_tensor_value_info("out2", TensorProto.FLOAT, ["batch", 64])
    )
    proto.graph.value_info.append(helper.make_tensor_value_info("w2", TensorProto.FLOAT, [64, 64]))
    helper.set_model_props(proto, {"author": "normopt test"})
    src = save(proto, tmp_path / "m.onnx")
    model = io.load(src)
    written = tmp_path / "streamed.onnx"
    files.save(model, written, external_data=False)
    with io._undescribed_initializers(model):  # what io.write hands onnx-ir's save
        expected = ir.serde.serialize_model(model)
    got = onnx.load(str(written))
    assert [t.name for t in got.graph.initializer] == ["w1", "b1", "w2"]
    assert got == expected
    assert got.graph == onnx.load(str(src)).graph
    x = {"x": np.ones((2, 64), np.float32)}
    for name in ("y", "out2"):
        np.testing.assert_array_equal(run_ort(src, x)[name], run_ort(written, x)[name])


def test_an_initializer_with_a_quantization_annotation_is_saved_by_onnx_ir_and_keeps_it(tmp_path):
    """The streamed writer does not write quantization annotations of initializers; such a
    model goes through onnx-ir's own save, and the annotation survives."""
    proto = mlp(d=64)
    note = proto.graph.quantization_annotation.add(tensor_name="w2")
    note.quant_parameter_tensor_names.add(key="SCALE_TENSOR", value="b1")
    model = io.load(save(proto, tmp_path / "m.onnx"))
    assert not io._streamable(model)
    files.save(model, tmp_path / "o.onnx", external_data=False)
    saved = onnx.load(str(tmp_path / "o.onnx")).graph.quantization_annotation
    assert [(a.tensor_name, a.quant_parameter_tensor_names[0].value) for a in saved] == [
        ("w2", "b1")
    ]


def test_the_installed_onnx_s_ir_version_loads(tmp_path):
    """A model saved by the installed onnx (1.23 writes IR 14) is read, as onnxruntime reads it."""
    model = mlp()
    model.ir_version = onnx.IR_VERSION
    assert io.load(save(model, tmp_path / "m.onnx")).ir_version == onnx.IR_VERSION


def test_nodes_out_of_order_are_sorted_on_load_and_reported(tmp_path):
    """onnxruntime's float16 converter leaves nodes out of topological order; onnxruntime runs
    such a file, so normopt sorts it on load (and cleanup reports the sort) instead of refusing."""
    from normopt.passes.cleanup import Cleanup

    model = mlp()
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(reversed(nodes))
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(model)
    loaded = io.load(path)
    assert [n.op_type for n in loaded.graph] == [n.op_type for n in nodes]
    result = Cleanup().run(loaded)
    assert "sorted 1 graph(s) topologically (IN's nodes were out of order)" in result.lines
    x = {"x": np.ones((3, 8), np.float32)}
    np.testing.assert_array_equal(
        run_ort(path, x)["y"], run_ort(save(mlp(), tmp_path / "s.onnx"), x)["y"]
    )


def _relocated(path, location):
    """The external-data model at `path` with every tensor's location set to `location`."""
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("escape", ["absolute", "parent", "sub_parent", "symlink"])
def test_external_data_outside_the_model_folder_is_refused_by_normopt(tmp_path, escape):
    """Found from outside: onnx 1.23's checker no longer refuses a location that escapes the
    model's folder, and onnx-ir raised at save (exit 4). normopt checks each location itself at
    load, after resolving symlinks, whatever onnx's version: exit 2 naming it, nothing written."""
    from typer.testing import CliRunner

    from normopt.cli import app

    folder, outside = tmp_path / "model", tmp_path / "outside"
    folder.mkdir()
    outside.mkdir()
    path = save(mlp(), folder / "m.onnx", external=True)
    data = folder / "m.onnx.data"
    target = outside / "w.data"
    os.replace(data, target)
    (folder / "sub").mkdir()
    location = {
        "absolute": str(target),
        "parent": "../outside/w.data",
        "sub_parent": "sub/../../outside/w.data",
        "symlink": "link.data",
    }[escape]
    if escape == "symlink":
        (folder / "link.data").symlink_to(target)
    _relocated(path, location)
    with pytest.raises(BadInput, match="external data at .*(absolute|outside the model's folder)"):
        io.load(path)
    result = CliRunner().invoke(app, ["rewrite", str(path), str(tmp_path / "out.onnx")])
    assert result.exit_code == 2 and "external data" in result.output
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("inside", ["subfolder", "symlink"])
def test_external_data_in_the_model_folder_loads(tmp_path, inside):
    path = save(mlp(), tmp_path / "m.onnx", external=True)
    (tmp_path / "sub").mkdir()
    os.replace(tmp_path / "m.onnx.data", tmp_path / "sub" / "w.data")
    if inside == "symlink":  # a link that stays inside the folder
        (tmp_path / "link.data").symlink_to(tmp_path / "sub" / "w.data")
    _relocated(path, "sub/w.data" if inside == "subfolder" else "link.data")
    assert io.uses_external_data(io.load(path))


@pytest.mark.parametrize("size", [16, 4096])
def test_an_embedded_tensor_with_short_raw_data_is_refused(tmp_path, size):
    """Found from outside: an embedded initializer over 1 KiB whose raw_data is short was exit
    4 (numpy raised where a pass read it; smaller ones failed the checker, exit 2). Now every
    embedded tensor's byte count is checked at load: exit 2 naming it."""
    model = mlp()
    weight = np.ones(size, np.float32)
    tensor = onnx.numpy_helper.from_array(weight, "big")
    tensor.raw_data = tensor.raw_data[: size * 4 - 8]
    model.graph.initializer.append(tensor)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    with pytest.raises(BadInput, match=f"tensor 'big' of shape \\[{size}\\] holds"):
        io.load(path)
