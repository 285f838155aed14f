"""A 512² PixArt-Σ image end to end with full-size random components: seconds per stage, peak RSS.

    python -m benchmarks.bench_sample_memory [--steps 20] [--folder DIR --keep]   (from the repository root)

Writes (in child processes, not counted) a random T5-XXL encoder (bf16 shards, 9.5 GB), a
random PixArt-XL/2 .ckpt (fp32, 2.4 GB) and a random SDXL VAE, then runs the pipeline as
sample.py does: T5 loaded, prompt encoded, T5 released; the DiT loaded and run for --steps
classifier-free-guidance steps in GRAPH mode; the VAE decodes. Target: peak RSS <= 12 GiB.
Memory does not depend on the number of steps; time per step is printed.
"""
import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("GLOG_v", "3")

import numpy as np  # noqa: E402

TARGET_GIB = 12.0


def status_gib(field):
    """VmRSS (now) or VmHWM (peak) of this process, GiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def write_components(folder):
    """Child process: the DiT checkpoint, the VAE folder and the tokenizer (T5 has its own writer)."""
    import json
    from pathlib import Path

    from pixart.models.autoencoder_kl import SDXL_VAE_CONFIG, AutoencoderKL
    from pixart.models.pixart import PixArtMS_XL_2
    from pixart.models.pixart_weights import save_pixart_ckpt
    from pixart.utils.checkpoint import save_safetensors
    from tests.tiny_models import make_tokenizer  # run as python -m benchmarks.bench_sample_memory

    model = PixArtMS_XL_2(input_size=64, pe_interpolation=1.0)
    rng = np.random.default_rng(0)
    for name, p in model.parameters_and_names():  # zero-initialised projections made active
        if not p.asnumpy().any():
            p.set_data(p.__class__(rng.normal(0, 0.02, p.shape).astype(np.float32), name=p.name))
    save_pixart_ckpt(model, os.path.join(folder, "PixArt-Sigma-XL-2-512-MS.ckpt"))
    del model
    vae = AutoencoderKL.from_config(SDXL_VAE_CONFIG)
    os.makedirs(os.path.join(folder, "vae"), exist_ok=True)
    state = {n: rng.normal(0, 0.02, p.shape).astype(np.float32) if p.ndim > 1 else p.asnumpy()
             for n, p in vae.parameters_and_names()}
    save_safetensors(state, os.path.join(folder, "vae", "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(folder, "vae", "config.json"), "w") as f:
        json.dump(vae.config.to_dict(), f)
    make_tokenizer(Path(folder) / "tokenizer")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--folder", help="where the random components go (default: a temp dir)")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--write-only", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.write_only:
        write_components(args.write_only)
        return
    folder = args.folder or tempfile.mkdtemp(prefix="pixart-e2e-")
    try:
        if not os.path.isfile(os.path.join(folder, "PixArt-Sigma-XL-2-512-MS.ckpt")):
            start = time.perf_counter()
            subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_t5_memory.py"), "--write-only",
                            os.path.join(folder, "text_encoder")], check=True)
            subprocess.run([sys.executable, "-m", "benchmarks.bench_sample_memory", "--write-only", folder], check=True,
                           cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            print(f"wrote random components in {time.perf_counter() - start:.0f} s", flush=True)
        run(folder, args.steps)
    finally:
        if not args.keep and not args.folder:
            shutil.rmtree(folder, ignore_errors=True)


def run(folder, steps):
    import mindspore as ms

    from pixart import PixArtSigmaPipeline

    ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")
    pipe = PixArtSigmaPipeline.from_components(
        os.path.join(folder, "PixArt-Sigma-XL-2-512-MS.ckpt"), os.path.join(folder, "vae"),
        os.path.join(folder, "text_encoder"), os.path.join(folder, "tokenizer"), image_size=512, mode="graph")
    rows = []

    def stage(name, fn):
        start = time.perf_counter()
        out = fn()
        rows.append((name, time.perf_counter() - start, status_gib("VmRSS"), status_gib("VmHWM")))
        print(f"{name}: {rows[-1][1]:.1f} s, RSS {rows[-1][2]:.2f} GiB, peak {rows[-1][3]:.2f} GiB", flush=True)
        return out

    prompt = "a small cactus with a happy face in the Sahara desert " * 8
    embeds = stage("T5-XXL load + encode (then released)", lambda: pipe.encode_prompt(prompt, ""))
    stage("DiT XL-2 load", lambda: pipe.transformer)
    latents = stage(f"denoise: {steps} CFG steps (graph mode, first compiles)", lambda: pipe(
        prompt_embeds=embeds[0], prompt_attention_mask=embeds[1], negative_prompt_embeds=embeds[2],
        negative_prompt_attention_mask=embeds[3], height=512, width=512, num_inference_steps=steps, seed=0,
        output_type="latent", progress=False).images)
    vae = stage("SDXL VAE load", lambda: pipe.vae)
    stage("VAE decode 512²", lambda: vae.decode(latents / vae.scaling_factor).asnumpy())
    peak = max(r[3] for r in rows)
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, MindSpore {ms.__version__} CPU")
    print("| stage | seconds | RSS after (GiB) | peak so far (GiB) |\n|---|---|---|---|")
    for name, secs, rss, hwm in rows:
        print(f"| {name} | {secs:.1f} | {rss:.2f} | {hwm:.2f} |")
    print(f"\npeak RSS {peak:.2f} GiB (target <= {TARGET_GIB} GiB): {'OK' if peak <= TARGET_GIB else 'OVER'}")


if __name__ == "__main__":
    main()
