"""Which verification fits (normopt.memory): full where both runs fit, by segments where not,
exit 2 with the figures where neither does, decided before any work."""

import subprocess
import sys

import pytest

from normopt.errors import BadInput
from normopt.memory import BASE, GB, Weights, available_bytes, parse_size, plan


@pytest.mark.parametrize(
    "text,size",
    [
        ("16G", 16 * 10**9),
        ("1.5GB", 15 * 10**8),
        ("800M", 8 * 10**8),
        ("512MiB", 512 << 20),
        ("4096", 4096),
        (" 2 gib ", 2 << 30),
    ],
)
def test_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "lots", "-1G", "1.2.3G", "5X"])
def test_a_size_that_is_not_one_is_refused(text):
    with pytest.raises(BadInput, match="give a size such as 16G"):
        parse_size(text)


def test_available_memory_is_positive():
    assert available_bytes() > 0


FP32_13B = Weights(other=int(5.67 * GB), half=0, largest_node=int(0.41 * GB))
FP16_67B = Weights(other=0, half=int(13.7 * GB), largest_node=int(0.41 * GB))


def test_auto_runs_whole_models_where_they_fit_and_segments_where_not():
    assert plan(FP32_13B, "auto", int(24 * GB)).method == "full"
    local = plan(FP16_67B, "auto", int(24 * GB))  # float16: onnxruntime upcasts every weight
    assert local.method == "local" and local.needed < 0.3 * 24 * GB
    assert local.why.startswith("a full one needs ~41.60 GB; by segments of")
    assert plan(FP32_13B, "auto", int(6 * GB)).method == "local"


def test_a_segment_is_at_most_an_eighth_of_the_model_and_at_least_its_largest_node():
    small = Weights(other=8 << 20, half=0, largest_node=3 << 20)
    assert plan(small, "local", int(24 * GB)).budget == 3 << 20
    assert plan(Weights(80 << 20, 0, 1 << 20), "local", int(24 * GB)).budget == 10 << 20
    assert plan(FP16_67B, "local", int(24 * GB)).budget == 1 << 30


def test_no_fit_is_refused_with_the_figures():
    with pytest.raises(BadInput) as refused:
        plan(FP32_13B, "auto", int(1 * GB))
    assert str(refused.value) == (
        "not enough memory to verify: a local verification needs ~2.14 GB, 1.00 GB "
        "--max-memory (its largest node reads 0.41 GB of weights; a full one needs ~6.74 GB); "
        "nothing written (--no-verify skips verification)"
    )
    with pytest.raises(BadInput, match="a full verification needs ~6.74 GB.*try --verify local"):
        plan(FP32_13B, "full", int(6 * GB))


def test_the_estimates_count_half_precision_weights_upcast():
    assert Weights(GB, 0, 0).full() == BASE + int(1.1 * GB)
    assert Weights(0, GB, 0).full() == BASE + int(3 * GB)


def test_cli_refuses_before_any_work_and_writes_nothing(tmp_path, cli_env):
    from tests.helpers import mlp, save

    src = save(mlp(), tmp_path / "m.onnx")
    out = tmp_path / "o.onnx"
    run = subprocess.run(
        [sys.executable, "-m", "normopt", "rewrite", str(src), str(out), "--max-memory", "1M"],
        capture_output=True,
        text=True,
        env=cli_env,
        check=False,
    )
    assert run.returncode == 2 and not out.exists() and not run.stdout
    assert run.stderr.startswith("normopt: error: not enough memory to verify: a local")
    assert len(run.stderr.strip().splitlines()) == 1
