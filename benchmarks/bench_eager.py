"""Eager (PyNative) work on CPU: MindSpore's asynchronous launch vs ops run on the calling thread.

    python benchmarks/bench_eager.py [--repeats 2] [--t5_folder DIR] [--vae_folder DIR]

By default PyNative hands each op to a backend thread and the Python thread that waits for the
result spins; ``pixart.utils.device.launch_cpu_ops_synchronously`` (what sample.py, train.py,
the tools and the pipelines do on CPU) runs the ops on the calling thread instead. Each variant
runs in a fresh process (the setting is process-wide), the variants alternate, medians over the
repeats. Workloads, all eager: one GEMM at T5-XXL's feed-forward shape (256 × 4096 → 10240, the
kernels' sgemm), a CFG step of XL-2 at 256² (fused kernels, 128 text tokens, ``--mode pynative``),
and with the folders of a diffusers layout (e.g. bench_pipeline's ``--folder``) T5-XXL encoding
4 × 64 tokens and an SDXL VAE decode at 256². Reports wall seconds and CPU seconds / wall seconds
(the cores kept busy, the spinner included).
"""
import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("GLOG_v", "3")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ("asynchronous (MindSpore default)", "synchronous (ours)")


def timed(fn, calls):
    """Median wall seconds of ``calls`` calls after a warm-up, and CPU / wall over them."""
    import numpy as np

    fn()
    walls, cpu0, wall0 = [], time.process_time(), time.perf_counter()
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t0)
    return {"s": float(np.median(walls)), "cores": (time.process_time() - cpu0) / (time.perf_counter() - wall0)}


def xl2_step(rng):
    """A CFG step of XL-2 at 256² as sample.py runs it on CPU with ``--mode pynative``."""
    import numpy as np
    import mindspore as ms

    from pixart.models.pixart import PixArtMS_XL_2
    from pixart.ops import cpu_kernels

    model = PixArtMS_XL_2(input_size=32, pe_interpolation=0.5, initialize=False)
    cpu_kernels.use_fused_kernels(model)
    model.set_train(False)
    latents = ms.Tensor(rng.standard_normal((2, 4, 32, 32)).astype(np.float32))
    t = ms.Tensor(np.array([500, 500], np.int32))
    context = model.text_context(ms.Tensor((rng.standard_normal((2, 128, 4096)) * 0.1).astype(np.float32)))
    mask = ms.Tensor(np.ones((2, 128), np.int32))
    return lambda: model(latents, t, context, mask).asnumpy()


def child(variant, t5_folder, vae_folder):
    """One fresh process: every workload eagerly; prints a JSON line."""
    sys.path.insert(0, ROOT)
    import numpy as np
    import mindspore as ms

    from pixart.ops import cpu_kernels
    from pixart.utils.device import launch_cpu_ops_synchronously

    ms.set_device("CPU")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    if variant == VARIANTS[1]:
        launch_cpu_ops_synchronously()
    rng = np.random.default_rng(0)
    results = {}

    x = ms.Tensor(rng.standard_normal((256, 4096)).astype(np.float32))
    w = ms.Tensor(rng.standard_normal((10240, 4096)).astype(np.float32))
    matmul = cpu_kernels.f32_matmul_op()
    results["GEMM 256 x 4096 -> 10240"] = timed(lambda: matmul(x, w).asnumpy(), 5)

    results["XL-2 CFG step 256², eager"] = timed(xl2_step(rng), 3)
    if t5_folder:
        from pixart.models.t5 import T5Encoder

        encoder = T5Encoder.from_pretrained(t5_folder)
        ids = ms.Tensor(rng.integers(1, 30000, (4, 64)).astype(np.int32))
        ones = ms.Tensor(np.ones((4, 64), np.int32))
        results["T5-XXL encode 4 x 64 tokens"] = timed(lambda: encoder(ids, ones).asnumpy(), 2)
        del encoder
    if vae_folder:
        from pixart.models.autoencoder_kl import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(vae_folder)
        cpu_kernels.use_fused_norms(vae)  # as the pipelines do for an fp32 VAE on CPU
        z = ms.Tensor(rng.standard_normal((1, 4, 32, 32)).astype(np.float32))
        results["VAE decode 256²"] = timed(lambda: vae.decode(z).asnumpy(), 2)
    print("RESULT " + json.dumps(results), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=2, help="fresh processes per variant")
    p.add_argument("--t5_folder", help="a T5 text_encoder/ folder (e.g. bench_pipeline's) for the T5 row")
    p.add_argument("--vae_folder", help="an SDXL vae/ folder for the VAE row")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child, args.t5_folder, args.vae_folder)
    import numpy as np

    folders = [f"--{name}={value}" for name, value in (("t5_folder", args.t5_folder), ("vae_folder", args.vae_folder))
               if value]
    runs = {variant: [] for variant in VARIANTS}
    for r in range(args.repeats):
        for variant in (VARIANTS if r % 2 == 0 else VARIANTS[::-1]):
            done = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", variant] + folders,
                                  capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"the {variant} run failed: {done.stderr.strip().splitlines()[-1:]}")
            runs[variant].append(json.loads(done.stdout.split("RESULT ", 1)[1]))
    print(f"{os.cpu_count()} cores, {args.repeats} fresh processes per variant, medians")
    print("| workload | " + " | ".join(f"{v} s (cores busy)" for v in VARIANTS) + " | async / sync |")
    print("|---|---|---|---|")
    for workload in runs[VARIANTS[0]][0]:
        cells, seconds = [], []
        for variant in VARIANTS:
            s = float(np.median([run[workload]["s"] for run in runs[variant]]))
            cores = float(np.median([run[workload]["cores"] for run in runs[variant]]))
            cells.append(f"{s:.2f} ({cores:.2f})")
            seconds.append(s)
        print(f"| {workload} | " + " | ".join(cells) + f" | {seconds[0] / seconds[1]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
