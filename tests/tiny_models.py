"""Tiny random PixArt pipelines saved as diffusers folders, for tests that need real weights files.

Everything is made here: a sentencepiece tokenizer trained on a few lines, a 2-layer T5, a 4-level
VAE with 8× downsampling and a 2-layer PixArt transformer, all with random non-zero weights.
"""
import io
import random

import numpy as np
import sentencepiece as spm
import torch
from transformers import T5Config, T5EncoderModel, T5Tokenizer

WORDS = ("a cat dog red blue green small large photo of the on in with house tree sky river car boat "
         "painting portrait city night day sun moon forest mountain beach happy face cactus").split()
T5_DIM = 32


def make_tokenizer(folder, seed=0, words=WORDS):
    """A T5Tokenizer folder around a unigram sentencepiece model (pad 0, </s> 1, <unk> 2) trained on
    random 12-word lines of ``words``."""
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(300)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=100,
                                   hard_vocab_limit=False, model_type="unigram", pad_id=0, eos_id=1, unk_id=2,
                                   bos_id=-1, character_coverage=1.0, minloglevel=2)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(model.getvalue())
    tokenizer = T5Tokenizer(str(folder / "spiece.model"), legacy=False)
    tokenizer.save_pretrained(folder)
    return tokenizer


def tiny_transformer(sample_size=32, micro=False, seed=0, caption_channels=T5_DIM, heads=2, head_dim=None,
                     interpolation_scale=None, depth=2):
    """A tiny random diffusers PixArtTransformer2DModel with every parameter non-zero (diffusers
    zero-inits some); head_dim defaults to 8 (12 with micro-conditions, whose embedders need D/3)."""
    from diffusers import PixArtTransformer2DModel

    head_dim = head_dim or (12 if micro else 8)
    torch.manual_seed(seed)
    model = PixArtTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=8,
        num_layers=depth, cross_attention_dim=heads * head_dim, caption_channels=caption_channels,
        sample_size=sample_size, patch_size=2, interpolation_scale=interpolation_scale,
        use_additional_conditions=micro, norm_type="ada_norm_single", norm_elementwise_affine=False,
        norm_eps=1e-6).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        # N(0, 0.02) as PixArt initialises them: their 256 inputs sin/cos(t·f) carry the reference's own
        # fp32 rounding at t≈1000 (~6e-5), which 0.3-scale weights would amplify past the tolerance.
        emb = model.adaln_single.emb
        for embedder in ("timestep_embedder", "resolution_embedder", "aspect_ratio_embedder"):
            if hasattr(emb, embedder):
                getattr(emb, embedder).linear_1.weight.normal_(0.0, 0.02)
    return model


def tiny_vae(scaling_factor=0.13025, seed=0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 16, 16),
                         layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=32,
                         scaling_factor=scaling_factor).eval()


# VAE variants for the VAE parity tests.
VAE_CONFIGS = {
    "small": dict(  # 2 levels (f = 2), mid-block attention
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4, sample_size=32,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2),
    "sd_like": dict(  # SD/SDXL's 4-level structure (f = 8, 2 resnets per level) at tiny width
        block_out_channels=(8, 8, 16, 16), layers_per_block=2, norm_num_groups=4, latent_channels=4,
        sample_size=64, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        scaling_factor=0.13025, force_upcast=True),
    "plain": dict(  # the optional parts switched off: no mid attention, no quant convs; odd channel counts
        block_out_channels=(6, 12), layers_per_block=1, norm_num_groups=3, latent_channels=3, sample_size=32,
        in_channels=3, out_channels=2, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, mid_block_add_attention=False,
        use_quant_conv=False, use_post_quant_conv=False),
}


def tiny_vae_variant(config, seed=0):
    """A diffusers AutoencoderKL from a config dict (e.g. ``VAE_CONFIGS["small"]``), GroupNorm
    parameters moved off their 1/0 initialisation so that they matter."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    model = AutoencoderKL(**config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model


def tiny_pixart(fixed_grid=False, random_seed=None, **overrides):
    """Our MindSpore DiT at the ``tiny`` preset (``PixArtConfig.preset("tiny")``), fields overridden.

    ``random_seed``: every weight random instead of the PixArt init (which zeroes the cross-attention
    and output projections), N(0, 1/fan_in) like a trained model so activations stay O(1)."""
    from pixart.models.pixart import PixArtConfig, build_pixart

    runtime = {k: overrides.pop(k) for k in ("attention_backend", "dtype", "initialize") if k in overrides}
    model = build_pixart(PixArtConfig.preset("tiny", **overrides), fixed_grid=fixed_grid, **runtime)
    if random_seed is not None:
        import mindspore as ms

        rng = np.random.default_rng(random_seed)
        for _, param in model.parameters_and_names():
            fan_in = int(np.prod(param.shape[1:])) if len(param.shape) > 1 else 100
            param.set_data(ms.Tensor(rng.normal(0.0, 1.0 / np.sqrt(fan_in), param.shape).astype(np.float32)))
    return model


# T5 variants for the T5 parity tests.
T5_CONFIGS = {
    # T5 v1.1 layout (gated-gelu); few buckets and a short max distance so a 37-token input
    # exercises exact, log-spaced and clamped buckets.
    "v1.1": dict(vocab_size=256, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                 relative_attention_num_buckets=8, relative_attention_max_distance=20,
                 feed_forward_proj="gated-gelu"),
    # heads x d_kv != d_model, XXL's bucket settings, another epsilon
    "wide-heads": dict(vocab_size=256, d_model=24, d_kv=10, d_ff=40, num_layers=3, num_heads=3,
                       relative_attention_num_buckets=32, relative_attention_max_distance=128,
                       feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-5),
    # original T5 feed-forward (relu, not gated)
    "relu": dict(vocab_size=256, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                 relative_attention_num_buckets=16, relative_attention_max_distance=10, feed_forward_proj="relu"),
}
_T5_LINEARS = (".q.", ".k.", ".v.", ".o.", ".wi.", ".wi_0.", ".wi_1.", ".wo.")


def randomize_t5(model, seed):
    """Non-trivial weights everywhere: norms 1 ± 0.2, projections ~ N(0, 1/fan_in)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "layer_norm" in name:
                p.copy_(1 + 0.2 * noise)
            elif p.ndim == 2 and any(k in name for k in _T5_LINEARS):
                p.copy_(noise / p.shape[1] ** 0.5)
            else:  # token embedding, relative position bias
                p.copy_(noise)
    return model.eval()


def tiny_t5_variant(name, seed=0, full=False):
    """A randomised transformers T5 encoder of ``T5_CONFIGS[name]`` (``full``: encoder-decoder)."""
    from transformers import T5ForConditionalGeneration

    if full:
        return randomize_t5(T5ForConditionalGeneration(T5Config(**T5_CONFIGS[name], num_decoder_layers=1)), seed)
    return randomize_t5(T5EncoderModel(T5Config(**T5_CONFIGS[name])), seed)


def tiny_t5_ours(name):
    """Our MindSpore T5 encoder of ``T5_CONFIGS[name]`` (zero weights: load some)."""
    from pixart.models.t5 import T5Config as OurT5Config, T5Encoder

    return T5Encoder(OurT5Config(**T5_CONFIGS[name]))


def tiny_t5(vocab_size, seed=0):
    torch.manual_seed(seed)
    config = T5Config(vocab_size=vocab_size, d_model=T5_DIM, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, relative_attention_max_distance=16,
                      feed_forward_proj="gated-gelu", dropout_rate=0.0, is_encoder_decoder=False)
    return T5EncoderModel(config).eval()


def make_pipeline_folder(folder, kind="sigma", sample_size=32, seed=0):
    """Save a tiny diffusers PixArt{Sigma,Alpha}Pipeline to ``folder``; returns the folder.

    ``kind="alpha"`` with ``sample_size=128`` gives the 1024-MS α layout (micro-conditions).
    """
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtSigmaPipeline

    tokenizer = make_tokenizer(folder / "tokenizer_src", seed)
    micro = kind == "alpha" and sample_size == 128
    cls = PixArtSigmaPipeline if kind == "sigma" else PixArtAlphaPipeline
    pipe = cls(tokenizer=tokenizer, text_encoder=tiny_t5(len(tokenizer), seed),
               vae=tiny_vae(0.13025 if kind == "sigma" else 0.18215, seed),
               transformer=tiny_transformer(sample_size, micro, seed), scheduler=DPMSolverMultistepScheduler())
    pipe.save_pretrained(folder)
    return folder


def seeded_latents(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def with_bf16_rounded_linears(model):
    """A torch model computing, in fp32, exactly what our bf16 GEMM does: its nn.Linear layers see
    bf16-rounded weights and inputs, everything else stays fp32."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(module.weight.bfloat16().float())
                module.register_forward_pre_hook(lambda m, args: (args[0].bfloat16().float(),))
    return model
