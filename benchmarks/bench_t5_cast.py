"""What bf16-stored T5 weights cost on CPU, and the ways around it: one T5-XXL linear, then 2 layers.

    python benchmarks/bench_t5_cast.py [--repeats 5] [--layers 2] [--skip_layers]

T5-XXL in fp32 is 19 GB, so its projections are stored in bf16 (9.5 GB) and upcast per call for
fp32 compute; MindSpore's CPU bf16 -> fp32 Cast made that a third of the encoder's time.
Part 1 times one ``pixart.models.t5.Linear`` (600 tokens = batch 2 × 300) for each weight policy,
interleaved (one repeat of each in turn):

    fp32 weights         no cast (19 GB for the whole model)
    bf16 + MS Cast       the old path: MindSpore's Cast, then an fp32 MatMul
    fp16 + MS Cast       fp16 storage (exact for bf16 values in 2^-17..65504), MindSpore's Cast
    bf16 + fast upcast   the custom bf16 -> fp32 kernel (pixart.ops.cpu_kernels), then fp32 MatMul
    bf16 GEMM            use_bf16_gemm: bf16 products, fp32 sums (not bitwise fp32: x is rounded)

and the casts alone. Part 2 runs the full-width T5-XXL encoder with ``--layers`` of its 24
layers (random weights, batch 2 × 300 tokens) under the same policies, against transformers'
T5EncoderModel in torch fp32 and bf16 on the same weights, and gives each one's max abs
difference from torch fp32. Prints the load average: the machine may be shared.
"""
import argparse
import os
import sys
import time

os.environ.setdefault("GLOG_v", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
import mindspore as ms  # noqa: E402

from pixart.models.t5 import Linear, T5Config, T5Encoder  # noqa: E402
from pixart.ops import cpu_kernels  # noqa: E402
from pixart.utils.checkpoint import load_into_cell  # noqa: E402
from pixart.utils.device import set_device  # noqa: E402

TOKENS = 600
XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_heads=64, relative_attention_num_buckets=32,
           relative_attention_max_distance=128, layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu")


def interleaved(run, repeats):
    """{name: median seconds}, one repeat of every candidate in turn after a warm-up of each."""
    for fn in run.values():
        fn()
    times = {name: [] for name in run}
    for _ in range(repeats):
        for name, fn in run.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(t)) for name, t in times.items()}


def _linear(weight, dtype, upcast=None, bf16_gemm=False):
    layer = Linear(weight.shape[1], weight.shape[0], dtype)
    layer.weight.set_data(ms.Tensor(weight.astype(np.float32), dtype=dtype))
    layer.upcast = upcast
    if bf16_gemm:
        holder = ms.nn.SequentialCell([layer])
        cpu_kernels.use_bf16_gemm(holder)
        return holder
    return layer


def bench_linear(n_in, n_out, repeats, rng):
    weight = (rng.standard_normal((n_out, n_in), np.float32) / np.sqrt(n_in)).astype(ml_dtypes.bfloat16)
    x = ms.Tensor(rng.standard_normal((TOKENS, n_in), np.float32))
    upcast = cpu_kernels.bf16_to_fp32_op() if cpu_kernels.fast_upcast_available() else None
    layers = {"fp32 weights": _linear(weight, ms.float32), "bf16 + MS Cast": _linear(weight, ms.bfloat16),
              "fp16 + MS Cast": _linear(weight, ms.float16)}
    if upcast is not None:
        layers["bf16 + fast upcast"] = _linear(weight, ms.bfloat16, upcast=upcast)
    if cpu_kernels.bf16_gemm_available():
        layers["bf16 GEMM"] = _linear(weight, ms.bfloat16, bf16_gemm=True)
    run = {name: (lambda layer=layer: layer(x).asnumpy()) for name, layer in layers.items()}
    w_bf16, w_fp16 = layers["bf16 + MS Cast"].weight, layers["fp16 + MS Cast"].weight
    run["cast only: MS bf16"] = lambda: w_bf16.astype(ms.float32).asnumpy()
    run["cast only: MS fp16"] = lambda: w_fp16.astype(ms.float32).asnumpy()
    if upcast is not None:
        run["cast only: fast upcast"] = lambda: upcast(w_bf16).asnumpy()
    return interleaved(run, repeats)


def _torch_state(layers, seed=0):
    import torch
    from transformers import T5Config as HFT5Config
    from transformers import T5EncoderModel

    torch.manual_seed(seed)
    model = T5EncoderModel(HFT5Config(**XXL, num_layers=layers)).eval()
    with torch.no_grad():  # T5-like scales, rounded to bf16 so every policy sees the same values
        for name, p in model.named_parameters():
            scale = 1.0 if "layer_norm" in name or "shared" in name or "relative" in name else p.shape[-1] ** -0.5
            value = (1 + 0.1 * torch.randn_like(p)) if "layer_norm" in name else torch.randn_like(p) * scale
            p.copy_(value.bfloat16().float())
    return model


def bench_layers(layers, repeats):
    import torch

    reference = _torch_state(layers)
    state = {k: v.numpy() for k, v in reference.state_dict().items() if k != "encoder.embed_tokens.weight"}
    ids = np.zeros((2, 300), np.int64)
    ids[:, :120] = np.random.default_rng(0).integers(3, 32000, (2, 120))
    ids[:, 120] = 1
    mask = (ids > 0).astype(np.int64)
    config = T5Config(**XXL, num_layers=layers)

    def ours(weight_dtype, fast_upcast=True, bf16_gemm=False):
        model = T5Encoder(config, weight_dtype=weight_dtype)
        load_into_cell(model, {k: v.astype(ml_dtypes.bfloat16) if v.ndim == 2 and "shared" not in k
                               and "relative" not in k and weight_dtype == ms.bfloat16 else v
                               for k, v in state.items()})
        if not fast_upcast:
            for _, cell in model.cells_and_names():
                if isinstance(cell, Linear):
                    cell.upcast = None
        if bf16_gemm:
            cpu_kernels.use_bf16_gemm(model)
        model.set_train(False)
        tensors = ms.Tensor(ids, ms.int32), ms.Tensor(mask, ms.int32)
        return lambda: model(*tensors).asnumpy()

    torch.set_num_threads(os.cpu_count())
    t_ids, t_mask = torch.from_numpy(ids), torch.from_numpy(mask)
    reference_bf16 = _torch_state(layers).to(torch.bfloat16)

    def torch_run(model):
        def run():
            with torch.no_grad():
                return model(input_ids=t_ids, attention_mask=t_mask).last_hidden_state.float().numpy()
        return run

    run = {"ours fp32 weights": ours(ms.float32), "ours bf16 + MS Cast": ours(ms.bfloat16, fast_upcast=False),
           "ours bf16 + fast upcast": ours(ms.bfloat16)}
    if cpu_kernels.bf16_gemm_available():
        run["ours bf16 GEMM"] = ours(ms.bfloat16, bf16_gemm=True)
    run["torch fp32"] = torch_run(reference)
    run["torch bf16"] = torch_run(reference_bf16)
    expected = run["torch fp32"]()
    errors = {name: float(np.abs(fn() - expected).max()) for name, fn in run.items()}
    return interleaved(run, repeats), errors, float(np.abs(expected).max())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--skip_layers", action="store_true", help="only part 1 (one linear)")
    args = parser.parse_args(argv)
    set_device("CPU")  # eager ops on the calling thread, as the entry points run them
    rng = np.random.default_rng(0)
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}; {os.cpu_count()} CPUs; "
          f"MindSpore {ms.__version__}; repeats {args.repeats} (median)")
    for n_in, n_out in ((4096, 10240), (4096, 4096)):
        med = bench_linear(n_in, n_out, args.repeats, rng)
        base = med["fp32 weights"]
        print(f"\nOne T5-XXL linear {n_in}→{n_out}, {TOKENS} tokens:\n| policy | s | vs fp32 weights |\n|---|---|---|")
        for name, seconds in med.items():
            print(f"| {name} | {seconds:.4f} | {seconds / base:.2f} |")
    if not args.skip_layers:
        med, errors, scale = bench_layers(args.layers, args.repeats)
        base = med["torch fp32"]
        print(f"\nT5-XXL, {args.layers} of 24 layers, batch 2 × 300 tokens (outputs up to {scale:.3g}):\n"
              "| encoder | s | vs torch fp32 | max abs diff vs torch fp32 |\n|---|---|---|---|")
        for name, seconds in med.items():
            print(f"| {name} | {seconds:.3f} | {seconds / base:.2f} | {errors[name]:.2e} |")
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
