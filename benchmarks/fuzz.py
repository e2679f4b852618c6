"""The long graph-fuzz campaign: random Pre-LN and Conv/BN/affine graphs through normopt's
pipelines, judged in onnxruntime against a float64 evaluation, without normopt's own check.

    python benchmarks/fuzz.py --n 10000 [--seed 0] [--jobs 2] [--save-failures DIR]
        [--crms | --rotate | --reparam | --evonorm]

Prints the counts (graphs, applied per pass, wrong, exit 4 = crash or invalid output, passes
silent about why they did nothing, not idempotent) and writes results/fuzz.json with the seed
and notes of every failure (a campaign: results/fuzz_CAMPAIGN.json); `--save-failures` writes
each failing graph as an .onnx file to turn into a regression test. `--crms`: the Pre-CRMSNorm
campaign instead, every graph a transformer through preln-to-rmsnorm + preln-to-crmsnorm
(--allow-hidden-state-change on odd seeds). `--rotate`: the rotation campaign, every graph a
transformer through preln-to-rmsnorm + rotate-stream (a random orthogonal Q on odd seeds, a
randomized Hadamard one on even ones; --allow-hidden-state-change on every third seed;
preln-to-rmsnorm converting every norm, as --rotate has it, on three seeds in five;
canonicalize-norms after, --target ort, on every fourth; DiT's adaLN on every seventh).
`--reparam`: the re-parameterization campaign, CNNs with parallel branches only (the other
seeds are skipped), through merge-branches alone (odd seeds) or the default pipeline.
`--evonorm`: CNNs with EvoNorms (every variant, both exporters' statistic forms, float16 too)
through the default pipeline (odd seeds) or a drawn one, simplify-evonorm among them. The
generator and the judge are tests/fuzzing.py, which the test suite runs with hypothesis on a
few hundred graphs.
"""

from __future__ import annotations

import argparse
import collections
import functools
import multiprocessing
import time
from pathlib import Path

import onnx
from common import ROOT, write  # noqa: F401  (puts the repository root on the path)

from normopt.passes.base import Options
from normopt.passes.pipeline import DEFAULT_PIPELINE
from tests import fuzzing


def one(
    seed: int,
    crms: bool = False,
    reparam: bool = False,
    rotate: bool = False,
    evonorm: bool = False,
) -> dict:
    choices = fuzzing.RandomChoices(seed)
    if evonorm:  # CNNs with EvoNorms, the default pipeline (odd seeds) or a drawn one
        case = fuzzing.cnn(choices, evonorm=True)
        names, options = (
            (list(DEFAULT_PIPELINE), Options())
            if seed % 2
            else fuzzing.pipeline_choice(choices, evonorm=True)
        )
    elif reparam:  # CNNs with parallel branches (others are skipped), merge-branches alone or
        case = fuzzing.cnn(choices)  # the default pipeline, by the seed's parity
        if not any(n.startswith("parallel branches") for n in case.notes):
            return {"seed": seed, "family": case.family, "skipped": True}
        names = ["merge-branches"] if seed % 2 else list(DEFAULT_PIPELINE)
        options = Options()
    elif crms:
        case = fuzzing.transformer(choices)
        names, options = (
            ["preln-to-rmsnorm", "preln-to-crmsnorm"],
            Options(allow_hidden_state_change=bool(seed % 2)),
        )
    elif rotate:
        case = fuzzing.transformer(choices, adaln=seed % 7 == 0)
        kind = "random" if seed % 2 else "hadamard"
        preln = "preln-to-rmsnorm{convert_all=1}" if seed % 5 < 3 else "preln-to-rmsnorm"
        names = [preln, f"rotate-stream{{kind={kind} seed={seed}}}"]
        names += ["canonicalize-norms"] if seed % 4 == 0 else []
        target = "ort" if seed % 4 == 0 else "onnx"
        options = Options(target=target, allow_hidden_state_change=seed % 3 == 0)
    else:
        case = fuzzing.graph(choices)
        names, options = fuzzing.pipeline_choice(choices)
    try:
        fuzzing.ort_run(case.model, case.feeds)
    except Exception as exc:  # the generator made a graph onnxruntime rejects: not normopt's
        return {"seed": seed, "family": case.family, "invalid": str(exc).splitlines()[0][:200]}
    verdict = fuzzing.judge(case, names, options)
    result = {
        "seed": seed,
        "family": case.family,
        "passes": names,
        "target": options.target,
        "applied": verdict.applied,
        "wrong": verdict.wrong,
        "crash": verdict.crash,
        "silent": verdict.silent,
        "not_idempotent": verdict.not_idempotent,
        "notes": case.notes,
    }
    if not verdict.ok:
        result["model"] = case.model.SerializeToString()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="graphs to generate")
    parser.add_argument("--seed", type=int, default=0, help="first seed (graph i uses seed + i)")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes")
    parser.add_argument(
        "--save-failures", type=Path, help="write each failing graph here as SEED.onnx"
    )
    parser.add_argument(
        "--crms",
        action="store_true",
        help="the Pre-CRMSNorm campaign: transformers through preln-to-rmsnorm + preln-to-crmsnorm",
    )
    parser.add_argument(
        "--rotate",
        action="store_true",
        help="the rotation campaign: transformers through preln-to-rmsnorm + rotate-stream",
    )
    parser.add_argument(
        "--reparam",
        action="store_true",
        help="the re-parameterization campaign: CNNs with parallel branches (the others skipped)",
    )
    parser.add_argument(
        "--evonorm",
        action="store_true",
        help="the EvoNorm campaign: CNNs with EvoNorms, default or drawn pipelines",
    )
    args = parser.parse_args()
    start = time.perf_counter()
    counts: collections.Counter = collections.Counter()
    failures = []
    with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        for result in pool.imap_unordered(
            functools.partial(
                one,
                crms=args.crms,
                reparam=args.reparam,
                rotate=args.rotate,
                evonorm=args.evonorm,
            ),
            range(args.seed, args.seed + args.n),
            chunksize=8,
        ):
            if result.get("skipped"):
                counts["skipped (no parallel branches)"] += 1
                continue
            counts["graphs"] += 1
            counts[f"graphs {result['family']}"] += 1
            if "invalid" in result:
                counts["invalid graphs (generator)"] += 1
                failures.append(result)
                continue
            counts["applied (any pass)"] += bool(result["applied"])
            for name in result["applied"]:
                counts[f"applied {name}"] += 1
            counts["wrong"] += bool(result["wrong"])
            counts["exit 4"] += bool(result["crash"])
            counts["silent refusals"] += bool(result["silent"])
            counts["not idempotent"] += bool(result["not_idempotent"])
            if "model" in result:
                model = result.pop("model")
                if args.save_failures:
                    args.save_failures.mkdir(parents=True, exist_ok=True)
                    onnx.save(
                        onnx.ModelProto.FromString(model),
                        str(args.save_failures / f"{result['seed']}.onnx"),
                    )
                failures.append(result)
    seconds = time.perf_counter() - start
    width = max(len(k) for k in counts)
    for key in [
        "graphs",
        "graphs transformer",
        "graphs cnn",
        "graphs evonorm",
        "applied (any pass)",
        *sorted(k for k in counts if k.startswith("applied ") and k != "applied (any pass)"),
        "wrong",
        "exit 4",
        "silent refusals",
        "not idempotent",
        "invalid graphs (generator)",
        "skipped (no parallel branches)",
    ]:
        print(f"{key:<{width}}  {counts.get(key, 0)}")
    print(f"{'seconds':<{width}}  {seconds:.0f}")
    for f in failures[:20]:
        what = (
            f.get("invalid")
            or f["wrong"]
            or (f["crash"] or "").strip().splitlines()[-1:]
            or f["silent"]
            or f["not_idempotent"]
        )
        print(f"  seed {f['seed']} ({f['family']}, {f.get('passes')}, {f.get('target')}): {what}")
    campaign = next((k for k in ("crms", "rotate", "reparam", "evonorm") if getattr(args, k)), None)
    path = write(
        f"fuzz_{campaign}" if campaign else "fuzz",
        {
            "n": args.n,
            "seed": args.seed,
            "counts": dict(counts),
            "seconds": seconds,
            "failures": failures,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
