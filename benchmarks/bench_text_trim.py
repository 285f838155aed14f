"""T5-XXL prompt encoding on CPU with and without text-token trimming, interleaved.

    python -m benchmarks.bench_text_trim --folder DIR [--dtype fp32|bf16] [--repeats 2]   (repo root)

DIR is a pipeline folder with a text_encoder/ and tokenizer/ (bench_pipeline.py writes one with
random full-size T5-XXL weights). Encodes two prompts and the empty negative prompt as the
pipeline does, padded to 300 tokens (``trim_text_tokens = False``, as diffusers) and trimmed to
the longest real prompt's bucket (the default), and reports the median seconds of each, the
speed-up, and the largest difference on the real token positions (0 expected: padded positions
do not change T5's real ones).
"""
import argparse
import os
import statistics
import time

os.environ.setdefault("GLOG_v", "3")

import numpy as np  # noqa: E402

PROMPTS = ["a small cactus with a happy face in the Sahara desert",
           "a watercolor painting of a lighthouse on a cliff at sunset"]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--folder", required=True)
    p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()

    from pixart.pipelines.config import PipelineConfig
    from pixart.utils.device import set_device

    set_device("CPU")
    pipe = PipelineConfig(pretrained_path=args.folder, compile_cache="none", dtype=args.dtype).build()
    pipe.low_memory = False
    pipe.text_encoder  # load once, untimed

    def encode(trim):
        pipe.trim_text_tokens = trim
        start = time.perf_counter()
        out = [t.asnumpy() for t in pipe.encode_prompt(PROMPTS, "")]
        return time.perf_counter() - start, out

    encode(True)  # warm-up: first touch of the mapped weights
    times = {False: [], True: []}
    outputs = {}
    for _ in range(args.repeats):
        for trim in (False, True):
            seconds, outputs[trim] = encode(trim)
            times[trim].append(seconds)
    padded, trimmed = outputs[False], outputs[True]
    length = trimmed[0].shape[1]
    diff = max(float(np.abs(padded[i][:, :length] * trimmed[i + 1][..., None] -
                             trimmed[i] * trimmed[i + 1][..., None]).max()) for i in (0, 2))
    assert not padded[1][:, length:].any(), "a real token lies past the trimmed length"
    pad_s, trim_s = statistics.median(times[False]), statistics.median(times[True])
    print(f"load average {os.getloadavg()[0]:.1f}; T5-XXL ({args.dtype}), 2 prompts + empty negative prompt")
    print("| text tokens | encode s (median of %d) |\n|---|---|" % args.repeats)
    print(f"| {padded[0].shape[1]} (padded, as diffusers) | {pad_s:.2f} |")
    print(f"| {length} (trimmed) | {trim_s:.2f} |")
    print(f"speed-up {pad_s / trim_s:.1f}×; max abs diff on real tokens {diff:.2e}")


if __name__ == "__main__":
    main()
