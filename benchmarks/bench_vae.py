"""Benchmark: full-size SDXL VAE decode, tiled vs untiled — seconds and peak resident memory.

The VAE has the SDXL config (83.7 M parameters) with random weights: speed and memory do not
depend on the values. Each case runs in its own process, so its peak RSS (``ru_maxrss``) is its
own and not the high-water mark of an earlier, larger case.

    python benchmarks/bench_vae.py                       # 512² and 1024², untiled and tiled
    python benchmarks/bench_vae.py --sizes 1024 --tile 512 --repeat 2

Measured once (MindSpore 2.7.2 CPU, 2 shared AMD EPYC cores at load average 6-9, so seconds are
inflated; first decode, fp32; tiles = half the image side, 3×3 tiles):
    512²   untiled  73.7 s  peak RSS 1.90 GiB  |  tiled 256 px   99.9 s  1.00 GiB
    1024²  untiled 319.9 s  peak RSS 5.76 GiB  |  tiled 512 px  311.5 s  2.00 GiB
(0.68 GiB of each is the process with the model built.)
"""
import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time


def run_case(size, tile, repeat, threads):
    """Decode one (1, 4, size/8, size/8) latent; prints one JSON line (runs in a child process)."""
    import numpy as np
    import mindspore as ms

    from pixart.utils.device import set_device

    set_device("CPU")  # eager ops on the calling thread, as the entry points run them
    if threads:
        ms.set_context(runtime_num_threads=threads)
    from pixart.models.autoencoder_kl import SDXL_VAE_CONFIG, AutoencoderKL

    start = time.perf_counter()
    vae = AutoencoderKL.from_config(SDXL_VAE_CONFIG)
    build_s = time.perf_counter() - start
    if tile:
        vae.enable_tiling(tile_sample_min_size=tile)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    z = np.random.default_rng(0).standard_normal((1, 4, size // 8, size // 8)).astype(np.float32)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        out = vae.decode(z, tiled=bool(tile)).asnumpy()  # asnumpy waits for the async ops
        times.append(time.perf_counter() - start)
    assert out.shape == (1, 3, size, size) and np.isfinite(out).all()
    print(json.dumps(dict(size=size, tile=tile, seconds=times, build_s=build_s,
                          rss_model_gib=rss_before,
                          peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024], help="image side in pixels")
    parser.add_argument("--tile", type=int, default=0,
                        help="tile side in pixels for the tiled run (default: half the image, 3×3 tiles)")
    parser.add_argument("--repeat", type=int, default=1, help="decodes per case (the first includes warm-up)")
    parser.add_argument("--threads", type=int, default=0, help="MindSpore CPU threads (default: its own)")
    parser.add_argument("--no-untiled", action="store_true", help="skip the untiled runs")
    parser.add_argument("--case", nargs=2, type=int, help=argparse.SUPPRESS)  # internal: size tile
    args = parser.parse_args(argv)
    if args.case:
        return run_case(args.case[0], args.case[1], args.repeat, args.threads)

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"python {platform.python_version()}")
    print(f"{'image':>9} {'mode':>14} {'decode s':>10} {'peak RSS GiB':>13} {'(model only)':>13}")
    for size in args.sizes:
        tiles = ([0] if not args.no_untiled else []) + [args.tile or size // 2]
        for tile in tiles:
            cmd = [sys.executable, os.path.abspath(__file__), "--case", str(size), str(tile),
                   "--repeat", str(args.repeat), "--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
            if proc.returncode or not lines:
                print(f"{size:>8}² {'tiled ' + str(tile) if tile else 'untiled':>14} failed "
                      f"(exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
                continue
            r = json.loads(lines[-1])
            secs = " / ".join(f"{s:.1f}" for s in r["seconds"])
            mode = f"tiled {tile}px" if tile else "untiled"
            print(f"{size:>8}² {mode:>14} {secs:>10} {r['peak_rss_gib']:>13.2f} {r['rss_model_gib']:>13.2f}",
                  flush=True)


if __name__ == "__main__":
    main()
