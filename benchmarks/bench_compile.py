"""Graph-compile time of the full PixArt-XL/2 DiT: every block compiled vs each block structure once.

    python benchmarks/bench_compile.py [--sizes 256 512] [--repeats 2]

The first graph-mode call of the DiT compiles it; with an empty compile cache that is part of
the first image a user waits for. Each run is a fresh process (MindSpore keeps parsed graphs for
the life of a process) that builds XL-2 as sample.py runs it on CPU (fp32, the fused kernels,
128 text tokens, the caption K/V made once), then calls it three times. Reported per variant,
medians over the repeats (the variants alternate): the first call, the faster later call, their
difference (the compile) and MindSpore's own count of its compile pipeline (``COMPILE_PROFILE``,
parse to kernel selection). Variants: "every block" (MindSpore inlines and compiles each of the
28 blocks), "blocks once" (``compile_blocks_once``, what the pipelines do).
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time

os.environ.setdefault("GLOG_v", "3")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ("every block", "blocks once")
SAMPLE_TOKENS = 128


def child(size, variant):
    """One fresh process: XL-2 at ``size``, the first and later calls; prints a JSON line."""
    sys.path.insert(0, ROOT)
    import numpy as np
    import mindspore as ms
    from mindspore._extends.parse import compile_config

    from pixart.models.pixart import PixArtMS_XL_2, compile_blocks_once
    from pixart.ops import cpu_kernels
    from pixart.tables import PE_INTERPOLATION

    compile_config.COMPILE_PROFILE = "1"  # MindSpore prints "TotalTime = s" for each compile
    latent = size // 8
    model = PixArtMS_XL_2(input_size=latent, pe_interpolation=PE_INTERPOLATION[size], initialize=False)
    cpu_kernels.use_fused_kernels(model)
    model.set_train(False)
    rng = np.random.default_rng(0)
    x = ms.Tensor(rng.standard_normal((2, 4, latent, latent)).astype(np.float32))
    t = ms.Tensor(np.array([500, 500], np.int32))
    context = model.text_context(ms.Tensor(rng.standard_normal((2, SAMPLE_TOKENS, 4096)).astype(np.float32)))
    mask = ms.Tensor(np.ones((2, SAMPLE_TOKENS), np.int32))
    ms.set_context(mode=ms.GRAPH_MODE)
    if variant == "blocks once":
        compile_blocks_once(model)
    calls = []
    for _ in range(3):
        t0 = time.perf_counter()
        model(x, t, context, mask).asnumpy()
        calls.append(time.perf_counter() - t0)
    sys.stdout.flush()
    print("RESULT " + json.dumps({"first": calls[0], "later": min(calls[1:])}), flush=True)


def run(size, variant):
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", str(size), variant],
                          capture_output=True, text=True, check=True)
    out = done.stdout + done.stderr  # MindSpore prints its profile on either, by version
    result = json.loads(out.split("RESULT ", 1)[1])
    profiled = re.findall(r"TotalTime = ([0-9.]+)", out)
    result["profiled"] = float(profiled[0]) if profiled else float("nan")
    result["compile"] = result["first"] - result["later"]
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(int(args.child[0]), args.child[1])
    import numpy as np

    print(f"{os.cpu_count()} cores; medians of {args.repeats} fresh processes per row")
    print("| image | blocks compiled | first call s | later call s | compile s (first - later) | "
          "MindSpore's compile profile s |")
    print("|---|---|---|---|---|---|", flush=True)
    for size in args.sizes:
        results = {v: [] for v in VARIANTS}
        for r in range(args.repeats):
            for variant in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
                results[variant].append(run(size, variant))
        for variant in VARIANTS:
            med = {k: float(np.median([r[k] for r in results[variant]]))
                   for k in ("first", "later", "compile", "profiled")}
            print(f"| {size}² | {variant} | {med['first']:.1f} | {med['later']:.1f} | {med['compile']:.1f} | "
                  f"{med['profiled']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
