"""End-to-end CPU benchmark: a 20-step PixArt-Σ image with full-size random T5-XXL, XL-2 and SDXL VAE,
this project against diffusers (PyTorch fp32 and bf16) on the same weights, in one run.

    python -m benchmarks.bench_pipeline --sizes 256 512 [--steps 20] [--folder DIR --keep]   (repo root)

Writes (child processes, not measured) a diffusers-format pipeline folder with random weights:
text_encoder/ (T5 v1.1 XXL, 4.76 B parameters, bf16 shards), transformer/ (XL-2, fp32), vae/
(SDXL), tokenizer/ (a small sentencepiece model) and scheduler/. Each framework then runs in a
fresh process (so each has its own peak RSS): T5 loads and encodes two prompts and the empty
negative prompt, is released, the DiT and VAE load, image 1 is denoised and decoded (the first
image, cold), then image 2 (warm). This project runs twice: with an empty compile cache and
again with the cache the first run filled (the second sample.py run of a user). Reported per
stage in seconds, and peak RSS (target for this project: <= 12 GiB). This project's CPU kernel library
is built before the clock (once per machine and source version, like an install step).

Every run starts from the same page-cache state (``--file_cache``): "warm" reads every weight file
once before each run (the files cached, as on a user's machine between runs), "cold" drops the
page cache before each run (needs root; the first run after a boot). Without it, whichever
framework runs later finds the files the earlier one read.
"""
import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("GLOG_v", "3")

import numpy as np  # noqa: E402

TARGET_GIB = 12.0
PROMPTS = ["a small cactus with a happy face in the Sahara desert",
           "a watercolor painting of a lighthouse on a cliff at sunset"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def peak_gib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# ----------------------------------------------------------------------------- random weights


def write_folder(folder):
    """Child process: transformer/, vae/, tokenizer/, scheduler/ and model_index.json (T5 separately)."""
    from pathlib import Path

    from benchmarks.bench_t5_memory import write_checkpoint
    from pixart.models.autoencoder_kl import SDXL_VAE_CONFIG, AutoencoderKL
    from pixart.models.pixart import PixArtMS_XL_2
    from pixart.models.pixart_weights import config_to_diffusers, original_to_diffusers
    from pixart.utils.checkpoint import save_safetensors
    from tests.tiny_models import make_tokenizer

    rng = np.random.default_rng(0)
    model = PixArtMS_XL_2(input_size=64, pe_interpolation=1.0, initialize=False)
    state = {n: rng.normal(0, 0.02, p.shape).astype(np.float32) for n, p in model.parameters_and_names()}
    os.makedirs(os.path.join(folder, "transformer"), exist_ok=True)
    save_safetensors(original_to_diffusers(state), os.path.join(folder, "transformer",
                                                                "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(folder, "transformer", "config.json"), "w") as f:
        json.dump(config_to_diffusers(model.config.to_dict()), f)
    del model, state
    vae = AutoencoderKL.from_config(SDXL_VAE_CONFIG)
    os.makedirs(os.path.join(folder, "vae"), exist_ok=True)
    save_safetensors({n: rng.normal(0, 0.02, p.shape).astype(np.float32) if p.ndim > 1 else p.asnumpy()
                      for n, p in vae.parameters_and_names()},
                     os.path.join(folder, "vae", "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(folder, "vae", "config.json"), "w") as f:
        json.dump({"_class_name": "AutoencoderKL", **vae.config.to_dict()}, f)
    make_tokenizer(Path(folder) / "tokenizer")
    os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump({"_class_name": "DPMSolverMultistepScheduler", "num_train_timesteps": 1000, "beta_start": 0.0001,
                   "beta_end": 0.02, "beta_schedule": "linear"}, f)
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump({"_class_name": "PixArtSigmaPipeline", "text_encoder": ["transformers", "T5EncoderModel"],
                   "tokenizer": ["transformers", "T5Tokenizer"], "transformer": ["diffusers", "PixArtTransformer2DModel"],
                   "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "DPMSolverMultistepScheduler"]}, f)
    write_checkpoint(os.path.join(folder, "text_encoder"))


# ----------------------------------------------------------------------------- one framework, one process


class Stages:
    def __init__(self):
        self.rows = {}

    def __call__(self, name, fn):
        start = time.perf_counter()
        out = fn()
        self.rows[name] = round(time.perf_counter() - start, 2)
        print(f"  {name}: {self.rows[name]:.1f} s (peak {peak_gib():.2f} GiB)", file=sys.stderr, flush=True)
        return out


def run_ours(folder, size, steps, cache, dtype_name):
    from pixart.pipelines.config import PipelineConfig
    from pixart.utils.device import set_device
    # Imports before the clock, as the diffusers worker's: the modules the pipeline imports lazily,
    # and transformers (the tokenizer's; 2-4 s with torch installed).
    from pixart.models import autoencoder_kl, pixart, t5, tokenizer  # noqa: F401
    from transformers import T5Tokenizer  # noqa: F401

    set_device("CPU")  # as sample.py: eager, ops launched on the calling thread
    from pixart.ops import cpu_kernels
    cpu_kernels.kernel_library()  # built once per machine and source (3-10 s of g++), as an install step would
    pipe = PipelineConfig(pretrained_path=folder, compile_cache=cache, dtype=dtype_name).build()
    stage = Stages()
    embeds = stage("T5 load + encode", lambda: pipe.encode_prompt(PROMPTS, ""))
    stage("DiT load", lambda: pipe.transformer)
    stage("VAE load", lambda: pipe.vae)
    for k in range(2):
        rows = slice(k, k + 1)
        latents = stage(f"image {k + 1}: denoise", lambda: pipe(
            prompt_embeds=embeds[0][rows], prompt_attention_mask=embeds[1][rows], negative_prompt_embeds=embeds[2][rows],
            negative_prompt_attention_mask=embeds[3][rows], height=size, width=size, num_inference_steps=steps,
            seed=k, output_type="latent", use_resolution_binning=False, progress=False).images)
        stage(f"image {k + 1}: decode", lambda: pipe.vae.decode(latents / pipe.vae.scaling_factor).asnumpy())
    return stage.rows, {"text_tokens": int(embeds[0].shape[1])}


def run_diffusers(folder, size, steps, dtype_name):
    import torch
    from diffusers import PixArtSigmaPipeline
    from transformers import T5EncoderModel, T5Tokenizer

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    torch.set_num_threads(os.cpu_count())
    stage = Stages()

    def encode():  # T5 alone, then released, as our pipeline does (19 GB in fp32 would not fit beside the rest)
        tokenizer = T5Tokenizer.from_pretrained(os.path.join(folder, "tokenizer"))
        encoder = T5EncoderModel.from_pretrained(os.path.join(folder, "text_encoder"), torch_dtype=dtype)
        pipe = PixArtSigmaPipeline(tokenizer=tokenizer, text_encoder=encoder, transformer=None, vae=None, scheduler=None)
        with torch.no_grad():
            out = pipe.encode_prompt(PROMPTS, negative_prompt="", device="cpu", clean_caption=False)
        del pipe, encoder
        return out

    embeds = stage("T5 load + encode", encode)
    pipe = stage("DiT load", lambda: PixArtSigmaPipeline.from_pretrained(folder, text_encoder=None, tokenizer=None,
                                                                       torch_dtype=dtype))
    pipe.set_progress_bar_config(disable=True)
    for k in range(2):
        rows = slice(k, k + 1)
        with torch.no_grad():
            latents = stage(f"image {k + 1}: denoise", lambda: pipe(
                prompt_embeds=embeds[0][rows], prompt_attention_mask=embeds[1][rows],
                negative_prompt=None, negative_prompt_embeds=embeds[2][rows],
                negative_prompt_attention_mask=embeds[3][rows], height=size, width=size, num_inference_steps=steps, output_type="latent",
                use_resolution_binning=False, generator=torch.Generator().manual_seed(k)).images)
            stage(f"image {k + 1}: decode", lambda: pipe.vae.decode(latents / pipe.vae.config.scaling_factor))
    return stage.rows, {"text_tokens": int(embeds[0].shape[1])}


def worker(args):
    if args.framework.startswith("ours"):
        dtype_name = args.framework.split("-")[1] if "-" in args.framework else "fp32"
        rows, info = run_ours(args.folder, args.size, args.steps, args.cache, dtype_name)
    else:
        rows, info = run_diffusers(args.folder, args.size, args.steps, args.framework.split("-")[1])
    print(json.dumps({"stages": rows, "peak_gib": round(peak_gib(), 2), **info}))


# ----------------------------------------------------------------------------- the run


def set_file_cache(folder, state):
    """Before a run: every file of ``folder`` read once ("warm") or the page cache dropped ("cold")."""
    if state == "cold":
        os.sync()
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("1\n")
        except OSError as err:
            sys.exit(f"--file_cache cold needs root to drop the page cache ({err.strerror})")
        return
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                while f.read(1 << 24):
                    pass


def first_image(rows):
    return sum(v for k, v in rows.items() if not k.startswith("image 2"))


def second_image(rows):
    return rows["image 2: denoise"] + rows["image 2: decode"]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--frameworks", nargs="+", default=["ours", "ours-bf16", "diffusers-fp32", "diffusers-bf16"],
                   choices=["ours", "ours-bf16", "diffusers-fp32", "diffusers-bf16"],
                   help="ours = fp32; ours-bf16 = sample.py --dtype bf16 (bf16 GEMMs on CPU)")
    p.add_argument("--folder", help="where the random components go (default: a temp dir)")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--file_cache", choices=["warm", "cold"], default="warm",
                   help="page cache before each run: the weight files read once (warm) or dropped (cold, root)")
    p.add_argument("--worker", dest="framework", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.framework:
        return worker(args)
    folder = args.folder or tempfile.mkdtemp(prefix="pixart-e2e-")
    cache = tempfile.mkdtemp(prefix="pixart-e2e-cache-")
    try:
        if not os.path.isfile(os.path.join(folder, "model_index.json")):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", f"from benchmarks.bench_pipeline import write_folder; "
                            f"write_folder({folder!r})"], check=True, cwd=ROOT)
            print(f"wrote random components in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        results = {}
        for size in args.sizes:
            runs = []
            for name in args.frameworks:
                if name.startswith("ours"):
                    tag = "ours" + (f" {name.split('-')[1]}" if "-" in name else " fp32")
                    runs += [(f"{tag} (empty compile cache)", name), (f"{tag} (compile cache filled)", name)]
                else:
                    runs.append((f"diffusers {name.split('-')[1]}", name))
            for label, name in runs:
                set_file_cache(folder, args.file_cache)
                print(f"{size}²: {label}", file=sys.stderr, flush=True)
                cmd = [sys.executable, "-m", "benchmarks.bench_pipeline", "--worker", name, "--size", str(size),
                       "--steps", str(args.steps), "--folder", folder, "--cache", cache]
                out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
                sys.stderr.write(out.stderr[-4000:] if out.returncode else "")
                results[(size, label)] = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 \
                    else {"failed": out.returncode}
        report(results, args)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        if not args.keep and not args.folder:
            shutil.rmtree(folder, ignore_errors=True)


def report(results, args):
    import mindspore as ms
    import torch

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; "
          f"MindSpore {ms.__version__}, PyTorch {torch.__version__}; {args.steps} steps, CFG, prompts of "
          f"{len(PROMPTS[0].split())}-{len(PROMPTS[1].split())} words; weight files {args.file_cache} in the "
          "page cache before each run")
    for size in args.sizes:
        rows = {label: r for (s, label), r in results.items() if s == size}
        bf16 = rows.get("diffusers bf16", {}).get("stages")
        fp32 = rows.get("diffusers fp32", {}).get("stages")
        print(f"\n{size}²\n| run | text tokens | T5 load+encode | DiT load | VAE load | image 1 denoise | image 1 decode | "
              "first image | second image | s/step (image 2) | vs bf16 first / second | vs fp32 step | peak RSS GiB |")
        print("|---" * 13 + "|")
        for label, r in rows.items():
            if "stages" not in r:
                print(f"| {label} | failed (exit {r['failed']}) |")
                continue
            s = r["stages"]
            step = s["image 2: denoise"] / args.steps
            ratio = (f"{first_image(s) / first_image(bf16):.2f} / {second_image(s) / second_image(bf16):.2f}"
                     if bf16 else "-")
            vs_fp32 = f"{step / (fp32['image 2: denoise'] / args.steps):.2f}" if fp32 else "-"
            print(f"| {label} | {r['text_tokens']} | {s['T5 load + encode']:.1f} | {s['DiT load']:.1f} | "
                  f"{s.get('VAE load', 0):.1f} | {s['image 1: denoise']:.1f} | {s['image 1: decode']:.1f} | "
                  f"{first_image(s):.1f} | {second_image(s):.1f} | {step:.2f} | {ratio} | {vs_fp32} | "
                  f"{r['peak_gib']:.2f} |")


if __name__ == "__main__":
    main()
