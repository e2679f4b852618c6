"""Bandwidth of normopt's Triton norm kernels on a CUDA GPU, beside a copy, torch eager and
torch.compile, in one run.

    python benchmarks/norm_kernels.py [--quick] [--out DIR]      (needs a CUDA GPU)

For tokens in {1, 128, 2048, 16384} x hidden in {768, 1024, 4096, 8192} and each hidden - 1
(CRMSNorm widths), fp16 and bf16: every kernel is first checked against a float64 reference
(||out - ref|| / ||ref||), then timed with triton.testing.do_bench (CUDA events, L2 flushed
before each run, median). Bandwidth = the fewest bytes the op must move (each input read once,
each output written once) / time, and as a share of a device-to-device copy of the same bytes
timed in the same run. Goals (issue "Norm kernels"): >= 90% of copy bandwidth at 16384 x 4096
fp16 for rms_norm, crms_norm and add_rms_norm; >= 1.0x torch.compile at >= 2048 tokens.
Prints a table and writes norm_kernels.json (into --out, e.g. $OUT on the device machine).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

TOKENS = [1, 128, 2048, 16384]
HIDDEN = [768, 1024, 4096, 8192]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only 2048 and 16384 tokens, hidden 4096")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("benchmarks/norm_kernels.py needs a CUDA GPU (run it through the device tool); none here",
              file=sys.stderr)
        return 2
    import torch.nn.functional as F
    import triton
    from triton.testing import do_bench

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from normopt.plugins.kernels import norms

    compiled_rms = torch.compile(lambda x, w: F.rms_norm(x, (x.shape[-1],), w, 1e-6))
    rows = []
    tokens = [2048, 16384] if args.quick else TOKENS
    hidden = [4096] if args.quick else HIDDEN
    for dtype in (torch.float16, torch.bfloat16):
        size = torch.finfo(dtype).bits // 8
        for t in tokens:
            for h in [x for d in hidden for x in (d, d - 1)]:
                x = torch.randn(t, h, device="cuda", dtype=dtype)
                r = torch.randn(t, h, device="cuda", dtype=dtype)
                w = torch.randn(h, device="cuda", dtype=dtype)
                b = torch.randn(h, device="cuda", dtype=dtype)
                ref_x = x.double()
                ref = {
                    "rms_norm": ref_x / torch.sqrt((ref_x ** 2).mean(-1, keepdim=True) + 1e-6) * w.double(),
                    "crms_norm": None,
                    "add_rms_norm": None,
                    "layer_norm": F.layer_norm(ref_x, (h,), w.double(), b.double(), 1e-5),
                }
                full = torch.cat([ref_x, -ref_x.sum(-1, keepdim=True)], -1)
                ref["crms_norm"] = (full / torch.sqrt((full ** 2).mean(-1, keepdim=True) + 1e-6))[:, :h] * w.double()
                s_ref = (x.float() + r.float()).to(dtype).double()
                ref["add_rms_norm"] = s_ref / torch.sqrt((s_ref ** 2).mean(-1, keepdim=True) + 1e-6) * w.double()
                ops = {
                    "rms_norm": (lambda: norms.rms_norm(x, w), 2 * t * h + h),
                    "crms_norm": (lambda: norms.crms_norm(x, w), 2 * t * h + h),
                    "add_rms_norm": (lambda: norms.add_rms_norm(x, r, w)[1], 4 * t * h + h),
                    "layer_norm": (lambda: norms.layer_norm(x, w, b), 2 * t * h + 2 * h),
                }
                eager = {"rms_norm": lambda: F.rms_norm(x, (h,), w, 1e-6), "layer_norm": lambda: F.layer_norm(x, (h,), w, b, 1e-5)}
                for name, (fn, elements) in ops.items():
                    out = fn().double()
                    error = float(torch.linalg.norm(out - ref[name]) / torch.linalg.norm(ref[name]))
                    nbytes = elements * size
                    src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
                    dst = torch.empty_like(src)
                    ms = do_bench(fn, warmup=50, rep=300, return_mode="median")
                    copy_ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
                    row = {"dtype": str(dtype).split(".")[-1], "tokens": t, "hidden": h, "kernel": name,
                           "rel_error": error, "ms": ms, "gb_s": nbytes / ms / 1e6,
                           "copy_gb_s": 2 * src.numel() / copy_ms / 1e6}
                    row["of_copy"] = row["gb_s"] / row["copy_gb_s"]
                    if name in eager:
                        row["x_eager"] = do_bench(eager[name], warmup=50, rep=300, return_mode="median") / ms
                    if name == "rms_norm":
                        compiled_rms(x, w)  # compile outside the timing
                        row["x_compile"] = do_bench(lambda: compiled_rms(x, w), warmup=50, rep=300, return_mode="median") / ms
                    rows.append(row)
    header = f"{'dtype':8s} {'tokens':>6s} {'hidden':>6s} {'kernel':13s} {'rel err':>8s} {'GB/s':>7s} {'of copy':>7s} {'x eager':>7s} {'x compile':>9s}"
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print(header)
    for row in rows:
        print(f"{row['dtype']:8s} {row['tokens']:6d} {row['hidden']:6d} {row['kernel']:13s} {row['rel_error']:8.1e} "
              f"{row['gb_s']:7.0f} {row['of_copy']:7.2f} {row.get('x_eager', float('nan')):7.2f} "
              f"{row.get('x_compile', float('nan')):9.2f}")
    big = [r for r in rows if r["tokens"] == 16384 and r["hidden"] == 4096 and r["dtype"] == "float16"
           and r["kernel"] != "layer_norm"]
    if big:
        print("at 16384 x 4096 fp16, share of copy bandwidth:", {r["kernel"]: round(r["of_copy"], 3) for r in big})
    wide = [r["x_compile"] for r in rows if "x_compile" in r and r["tokens"] >= 2048]
    if wide:
        print(f"rms_norm vs torch.compile at >= 2048 tokens: min {min(wide):.2f}x, median {statistics.median(wide):.2f}x")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "norm_kernels.json").write_text(json.dumps(
        {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
         "python": platform.python_version(), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
