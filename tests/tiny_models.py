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


def make_tokenizer(folder, seed=0):
    """A T5Tokenizer folder around a unigram sentencepiece model (pad 0, </s> 1, <unk> 2)."""
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(300)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=100,
                                   hard_vocab_limit=False, model_type="unigram", pad_id=0, eos_id=1, unk_id=2,
                                   bos_id=-1, character_coverage=1.0, minloglevel=2)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(model.getvalue())
    tokenizer = T5Tokenizer(str(folder / "spiece.model"), legacy=False)
    tokenizer.save_pretrained(folder)
    return tokenizer


def tiny_transformer(sample_size=32, micro=False, seed=0, caption_channels=T5_DIM):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    model = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8 if not micro else 12, in_channels=4, out_channels=8,
        num_layers=2, cross_attention_dim=16 if not micro else 24, caption_channels=caption_channels,
        sample_size=sample_size, patch_size=2, use_additional_conditions=micro, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        emb = model.adaln_single.emb  # as PixArt initialises them (their inputs are large sinusoids)
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


def tiny_pixart(fixed_grid=False, **overrides):
    """Our MindSpore DiT at the ``tiny`` preset (``PixArtConfig.preset("tiny")``), fields overridden."""
    from pixart.models.pixart import PixArtConfig, build_pixart

    runtime = {k: overrides.pop(k) for k in ("attention_backend", "dtype", "initialize") if k in overrides}
    return build_pixart(PixArtConfig.preset("tiny", **overrides), fixed_grid=fixed_grid, **runtime)


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
