"""Bandwidth of normopt's Triton norm kernels on a CUDA GPU, beside a copy and torch baselines.

In one run: each kernel, a device-to-device copy of the same bytes, torch eager, torch.compile.

    python benchmarks/norm_kernels.py [--quick] [--tune] [--out DIR]     (needs a CUDA GPU)
        [--tokens 2048,16384] [--hidden 4096] [--dtypes float16]         (a part of the grid)
    python benchmarks/norm_kernels.py --smoke                             (CPU: checks the script)

For tokens in {1, 128, 2048, 16384} x hidden in {768, 1024, 4096, 8192} and each hidden - 1
(CRMSNorm widths), fp16 and bf16, every kernel is first checked against a float64 reference
(||out - ref|| / ||ref||, the run stops above the dtype's bound), then timed: for each of
--runs rounds (>= 200) the kernel, the copy and the torch baselines run in a fresh random
order, each after a write of 4x L2 bytes (the L2 flush, which also hides the launch on the
host), timed with CUDA events; medians and p90 per variant. Bandwidth = the fewest bytes the
op must move (each input read once, each output written once) / time, and as a share of the
copy. Baselines: torch eager `F.rms_norm` / `F.layer_norm` (add_rms_norm: `x + r` then
`F.rms_norm`), and torch.compile (inductor, static shapes) of the same torch code; CRMSNorm's
torch code is its formula.

Goals (issue "Norm kernels"): >= 90% of copy bandwidth at 16384 x 4096 fp16 for rms_norm,
crms_norm and add_rms_norm; >= 1.0x torch.compile at every shape with >= 2048 tokens.
--tune also times every launch configuration in `norms.candidates` at >= 2048 tokens.

Prints a table and the goal verdicts; writes norm_kernels.json and norm_kernels.md (the table
for the README) into --out (benchmarks/results by default; $OUT on the device machine).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TOKENS = [1, 128, 2048, 16384]
HIDDEN = [768, 1024, 4096, 8192]
KERNELS = ("rms_norm", "crms_norm", "add_rms_norm", "layer_norm")
EPS = {"layer_norm": 1e-5}  # the rest 1e-6
MAX_REL_ERROR = {"float16": 2e-3, "bfloat16": 1.6e-2, "float32": 2e-5}
COPY_GOAL = (16384, 4096, "float16", ("rms_norm", "crms_norm", "add_rms_norm"), 0.90)
COMPILE_GOAL = (2048, 1.0)


def minimal_bytes(kernel: str, tokens: int, hidden: int, itemsize: int) -> int:
    """The fewest bytes `kernel` must move: each input read once, each output written once.
    rms/crms: x in, y out, weight; add_rms: x and r in, sum and y out, weight; layer_norm: x in,
    y out, weight and bias."""
    rows = {"rms_norm": 2, "crms_norm": 2, "add_rms_norm": 4, "layer_norm": 2}[kernel]
    vectors = 2 if kernel == "layer_norm" else 1
    return (rows * tokens * hidden + vectors * hidden) * itemsize


def goals(rows: list[dict]) -> list[dict]:
    """The issue's two goals, judged on the measured rows: a goal with no row to judge is
    'not measured', never passed."""
    tokens, hidden, dtype, kernels, share = COPY_GOAL
    out = []
    for kernel in kernels:
        found = [
            r["of_copy"]
            for r in rows
            if (r["tokens"], r["hidden"], r["dtype"], r["kernel"], r.get("config"))
            == (tokens, hidden, dtype, kernel, None)
        ]
        out.append(
            {
                "goal": f"{kernel} >= {share:.0%} of copy bandwidth at {tokens} x {hidden} {dtype}",
                "value": found[0] if found else None,
                "verdict": "not measured"
                if not found
                else "met"
                if found[0] >= share
                else "NOT MET",
            }
        )
    min_tokens, ratio = COMPILE_GOAL
    for kernel in kernels:
        found = [
            r
            for r in rows
            if r["kernel"] == kernel
            and r["tokens"] >= min_tokens
            and "x_compile" in r
            and r.get("config") is None
        ]
        worst = min(found, key=lambda r: r["x_compile"]) if found else None
        out.append(
            {
                "goal": f"{kernel} >= {ratio:.1f}x torch.compile at every shape with >= "
                f"{min_tokens} tokens",
                "value": worst["x_compile"] if worst else None,
                "worst": f"{worst['tokens']} x {worst['hidden']} {worst['dtype']}"
                if worst
                else None,
                "verdict": "not measured"
                if not worst
                else "met"
                if worst["x_compile"] >= ratio
                else "NOT MET",
            }
        )
    return out


def table(rows: list[dict]) -> list[str]:
    """Markdown table lines of the default-config rows."""
    lines = [
        "| dtype | tokens | hidden | kernel | rel err | GB/s | of copy | x eager | x compile |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        if r.get("config") is not None:
            continue
        lines.append(
            f"| {r['dtype']} | {r['tokens']} | {r['hidden']} | {r['kernel']} | "
            f"{r['rel_error']:.1e} | "
            f"{r['gb_s']:.0f} | {r['of_copy']:.2f} | {_ratio(r.get('x_eager'))} | "
            f"{_ratio(r.get('x_compile'))} |"
        )
    return lines


def _ratio(value) -> str:
    return "-" if value is None else f"{value:.2f}"


class Timer:
    """Interleaved timing of several callables: each round runs them in a fresh random order,
    each after an L2 flush; on CUDA with events, on CPU (--smoke) with perf_counter."""

    def __init__(self, torch, device: str):
        self.torch, self.device = torch, device
        if device == "cuda":
            l2 = torch.cuda.get_device_properties(0).L2_cache_size
            self.flush = torch.empty(max(4 * l2, 256 << 20), dtype=torch.uint8, device="cuda")
        else:
            self.flush = torch.empty(1 << 20, dtype=torch.uint8)

    def run(self, variants: dict, runs: int, warmup: int = 10) -> dict[str, dict]:
        torch = self.torch
        for fn in variants.values():
            for _ in range(warmup):
                fn()
        samples = {name: [] for name in variants}
        rng = random.Random(0)
        for _ in range(runs):
            order = list(variants)
            rng.shuffle(order)
            for name in order:
                self.flush.zero_()
                if self.device == "cuda":
                    start, end = (
                        torch.cuda.Event(enable_timing=True),
                        torch.cuda.Event(enable_timing=True),
                    )
                    start.record()
                    variants[name]()
                    end.record()
                    samples[name].append((start, end))
                else:
                    t0 = time.perf_counter()
                    variants[name]()
                    samples[name].append(time.perf_counter() - t0)
        if self.device == "cuda":
            torch.cuda.synchronize()
            samples = {k: [s.elapsed_time(e) for s, e in v] for k, v in samples.items()}
        else:
            samples = {k: [t * 1e3 for t in v] for k, v in samples.items()}
        return {
            k: {
                "median": statistics.median(v),
                "p90": statistics.quantiles(v, n=10)[-1] if len(v) > 1 else v[0],
                "runs": len(v),
            }
            for k, v in samples.items()
        }


def _compiled(torch, smoke: bool):
    """torch.compile'd torch versions of the kernels (static shapes; one compile per shape)."""
    import torch.nn.functional as F

    for name in (
        "cache_size_limit",
        "recompile_limit",
        "accumulated_cache_size_limit",
        "accumulated_recompile_limit",
    ):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 4096)  # else it falls back to eager after 8 shapes

    def crms(x, w):
        x32 = x.float()
        ms = (x32.pow(2).sum(-1, keepdim=True) + x32.sum(-1, keepdim=True).pow(2)) / (
            x.shape[-1] + 1
        )
        return (x32 * torch.rsqrt(ms + 1e-6)).to(x.dtype) * w

    def add_rms(x, r, w):
        s = x + r
        return s, F.rms_norm(s, (x.shape[-1],), w, 1e-6)

    kwargs = {"backend": "eager"} if smoke else {"dynamic": False}
    return {
        "rms_norm": torch.compile(lambda x, w: F.rms_norm(x, (x.shape[-1],), w, 1e-6), **kwargs),
        "crms_norm": torch.compile(crms, **kwargs),
        "add_rms_norm": torch.compile(add_rms, **kwargs),
    }


def _references(torch, x, r, w, b):
    """float64 references of every kernel."""
    import torch.nn.functional as F

    def normalized(v):
        return v / torch.sqrt((v**2).mean(-1, keepdim=True) + 1e-6)

    xd, wd, h = x.double(), w.double(), x.shape[-1]
    full = torch.cat([xd, -xd.sum(-1, keepdim=True)], -1)  # CRMSNorm's implicit d-th entry
    return {
        "rms_norm": normalized(xd) * wd,
        "crms_norm": normalized(full)[:, :h] * wd,
        "add_rms_norm": normalized((x.float() + r.float()).to(x.dtype).double()) * wd,
        "layer_norm": F.layer_norm(xd, (h,), wd, b.double(), 1e-5),
    }


def measure(torch, norms, device, dtype, tokens, hidden, runs, compiled, configs) -> list[dict]:
    """Rows for one (dtype, tokens, hidden): every kernel (and each extra config) checked against
    float64, then timed beside the copy of its minimal bytes and the torch baselines."""
    import torch.nn.functional as F

    g = torch.Generator(device=device).manual_seed(tokens * 100003 + hidden)
    x, r = (torch.randn(tokens, hidden, device=device, generator=g).to(dtype) for _ in range(2))
    w, b = (torch.randn(hidden, device=device, generator=g).to(dtype) for _ in range(2))
    refs = _references(torch, x, r, w, b)
    ours = {
        "rms_norm": lambda c: norms.rms_norm(x, w, 1e-6, c),
        "crms_norm": lambda c: norms.crms_norm(x, w, 1e-6, c),
        "add_rms_norm": lambda c: norms.add_rms_norm(x, r, w, 1e-6, c)[1],
        "layer_norm": lambda c: norms.layer_norm(x, w, b, 1e-5, c),
    }
    eager = {
        "rms_norm": lambda: F.rms_norm(x, (hidden,), w, 1e-6),
        "add_rms_norm": lambda: F.rms_norm(x + r, (hidden,), w, 1e-6),
        "layer_norm": lambda: F.layer_norm(x, (hidden,), w, b, 1e-5),
    }
    comp = {
        "rms_norm": lambda: compiled["rms_norm"](x, w),
        "crms_norm": lambda: compiled["crms_norm"](x, w),
        "add_rms_norm": lambda: compiled["add_rms_norm"](x, r, w),
    }
    timer = Timer(torch, device)
    dtype_name = str(dtype).split(".")[-1]
    rows = []
    for kernel in KERNELS:
        nbytes = minimal_bytes(kernel, tokens, hidden, x.element_size())
        src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        variants = {"copy": lambda: dst.copy_(src)}
        for config in [None, *configs]:
            out = ours[kernel](config).double()
            error = float(torch.linalg.norm(out - refs[kernel]) / torch.linalg.norm(refs[kernel]))
            if not error <= MAX_REL_ERROR[dtype_name]:
                raise SystemExit(
                    f"{kernel} {tokens}x{hidden} {dtype_name} config {config}: relative error "
                    f"{error:.2e} > {MAX_REL_ERROR[dtype_name]:.0e}"
                )
            variants[("ours", config)] = (lambda c: lambda: ours[kernel](c))(config)
            rows.append(
                {
                    "dtype": dtype_name,
                    "tokens": tokens,
                    "hidden": hidden,
                    "kernel": kernel,
                    "config": config,
                    "rel_error": error,
                    "bytes": nbytes,
                }
            )
        if kernel in eager:
            variants["eager"] = eager[kernel]
        if kernel in comp:
            comp[kernel]()  # compile outside the timing
            variants["compile"] = comp[kernel]
        times = timer.run(variants, runs)
        copy_ms = times["copy"]["median"]
        for row in rows[-1 - len(configs) :]:
            t = times[("ours", row["config"])]
            row.update(
                ms=t["median"],
                p90_ms=t["p90"],
                runs=t["runs"],
                copy_ms=copy_ms,
                gb_s=nbytes / t["median"] / 1e6,
                copy_gb_s=2 * src.numel() / copy_ms / 1e6,
            )
            row["of_copy"] = row["gb_s"] / row["copy_gb_s"]
            for base in ("eager", "compile"):
                if base in times:
                    row[f"x_{base}"] = times[base]["median"] / t["median"]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="only 2048 and 16384 tokens, hidden 4096 (and 4095)"
    )
    parser.add_argument(
        "--tune",
        action="store_true",
        help="also time every candidate launch config at >= 2048 tokens",
    )
    parser.add_argument(
        "--tokens",
        type=lambda v: [int(t) for t in v.split(",")],
        default=TOKENS,
        help="comma-separated token counts (default 1,128,2048,16384)",
    )
    parser.add_argument(
        "--hidden",
        type=lambda v: [int(h) for h in v.split(",")],
        default=HIDDEN,
        help="comma-separated hidden sizes d, each also run at d-1 (default 768,1024,4096,8192)",
    )
    parser.add_argument(
        "--dtypes",
        type=lambda v: v.split(","),
        default=["float16", "bfloat16"],
        help="comma-separated storage dtypes (default float16,bfloat16)",
    )
    parser.add_argument(
        "--runs", type=int, default=200, help="timed rounds per shape (default and minimum 200)"
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="check this script on CPU through Triton's interpreter (tiny shapes, no timing goals)",
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    if args.smoke:
        import os

        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print(
            "benchmarks/norm_kernels.py needs a CUDA GPU (run it through the device tool); none "
            "here. "
            "--smoke checks the script on CPU.",
            file=sys.stderr,
        )
        return 2
    import triton

    from normopt.plugins.kernels import norms

    if args.smoke:
        tokens, hidden, runs = [1, 3], [48], 3  # 48 and 47: both launch paths, two configs
    elif args.quick:
        tokens, hidden, runs = [2048, 16384], [4096], max(args.runs, 200)
    else:
        tokens, hidden, runs = args.tokens, args.hidden, max(args.runs, 200)
    compiled = _compiled(torch, args.smoke)
    rows = []
    for dtype in (getattr(torch, d) for d in args.dtypes):
        for t in tokens:
            for h in [x for d in hidden for x in (d, d - 1)]:
                configs = (
                    list(norms.candidates(h)[1:]) if args.tune and t >= 2048 or args.smoke else []
                )
                rows += measure(torch, norms, device, dtype, t, h, runs, compiled, configs)
                print(f"  {str(dtype).split('.')[-1]} {t} x {h} done", file=sys.stderr, flush=True)
    name = (
        torch.cuda.get_device_name()
        if device == "cuda"
        else f"CPU (Triton interpreter): {platform.processor()}"
    )
    date = datetime.date.today().isoformat()
    print(
        f"{name}, {date}, torch {torch.__version__}, triton {triton.__version__}, "
        f"median of {runs} interleaved runs, L2 flushed"
    )
    lines = table(rows)
    print("\n".join(lines))
    if args.tune or args.smoke:
        print("\nlaunch configs (BLOCK, warps): median ms, best first")
        for key in sorted(
            {
                (r["dtype"], r["tokens"], r["hidden"], r["kernel"])
                for r in rows
                if r["config"] is not None
            }
        ):
            same = [r for r in rows if (r["dtype"], r["tokens"], r["hidden"], r["kernel"]) == key]
            same.sort(key=lambda r: r["ms"])
            print(
                " ".join(map(str, key)),
                " ".join(
                    f"{r['config'] or norms.launch_config(r['hidden'])}:{r['ms']:.4f}" for r in same
                ),
            )
    verdicts = goals(rows)
    print()
    for v in verdicts:
        value = (
            ""
            if v["value"] is None
            else f" ({v['value']:.3f}{', worst ' + v['worst'] if v.get('worst') else ''})"
        )
        print(f"{v['verdict']:12s} {v['goal']}{value}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "norm_kernels.json").write_text(
        json.dumps(
            {
                "device": name,
                "date": date,
                "torch": torch.__version__,
                "triton": triton.__version__,
                "python": platform.python_version(),
                "runs": runs,
                "rows": rows,
                "goals": verdicts,
            },
            indent=2,
        )
    )
    (args.out / "norm_kernels.md").write_text(
        f"{name}, {date}, torch {torch.__version__}, triton {triton.__version__}\n\n"
        + "\n".join(lines)
        + "\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
