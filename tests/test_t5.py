"""T5 encoder and prompt tokenizer: parity with transformers, every checkpoint layout, the errors.

Reference models are tiny random transformers ``T5EncoderModel``s saved with save_pretrained;
the tokenizer is a sentencepiece model trained here on a few lines, saved as a T5Tokenizer folder.
"""
import json
import logging
import os
import sys
import types

import mindspore as ms
import numpy as np
import pytest
import torch
from transformers import T5EncoderModel, T5Tokenizer
from transformers.models.t5.modeling_t5 import T5Attention

from pixart.models import tokenizer as tokenizer_module
from pixart.models.t5 import Linear, T5Encoder, relative_position_buckets
from pixart.ops.cpu_kernels import Bf16GatedFeedForward, Bf16Linear
from pixart.models.tokenizer import PromptTokenizer, encode_prompts, preprocess_text
from pixart.utils.checkpoint import load_into_cell, read_safetensors, save_safetensors
from pixart.utils.errors import CheckpointError, ConfigError
from tiny_models import T5_CONFIGS, make_tokenizer, tiny_t5_ours, tiny_t5_variant, with_bf16_rounded_linears

ATOL = 1e-4  # fp32 vs fp32

CONFIGS = T5_CONFIGS
LINEAR_NAMES = (".q.", ".k.", ".v.", ".o.", ".wi.", ".wi_0.", ".wi_1.", ".wo.")
HINT = "PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers"


# ----------------------------------------------------------------------------- helpers


def _hf_encoder(name, seed=0):
    return tiny_t5_variant(name, seed)


def _inputs(vocab, n=2, length=37, valid=(37, 21), seed=0):
    """Batch of ids with </s> ending each prompt and <pad> (0) after it; mask 0 on padding."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, size=(n, length))
    mask = np.zeros((n, length), np.int64)
    for row, count in enumerate(valid):
        ids[row, count - 1] = 1
        ids[row, count:] = 0
        mask[row, :count] = 1
    return ids, mask


def _reference(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state.float().numpy()


def _ours(encoder, ids, mask):
    return encoder(ms.Tensor(ids, ms.int32), ms.Tensor(mask, ms.int32)).asnumpy()


def _assert_close(actual, expected, atol=ATOL):
    assert actual.shape == expected.shape
    err = np.abs(actual - expected).max()
    assert err <= atol, f"max abs diff {err:.3g} > {atol}"


def _assert_one_line(err, *needles):
    text = str(err.value)
    assert "\n" not in text
    for needle in needles:
        assert needle in text, f"{needle!r} not in {text!r}"


# ----------------------------------------------------------------------------- the encoder


@pytest.mark.parametrize("buckets,distance", [(32, 128), (8, 20), (16, 10), (64, 256), (12, 30)])
def test_relative_position_buckets_match_transformers(buckets, distance):
    length = 300
    relative = torch.arange(length)[None, :] - torch.arange(length)[:, None]
    expected = T5Attention._relative_position_bucket(relative, True, buckets, distance).numpy()
    np.testing.assert_array_equal(relative_position_buckets(length, length, buckets, distance), expected)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_matches_transformers_fp32(tmp_path, name):
    reference = _hf_encoder(name)
    reference.save_pretrained(tmp_path)
    encoder = T5Encoder.from_pretrained(tmp_path)
    # the cell tree's names are the Hugging Face keys (embed_tokens is tied to shared)
    hf_keys = set(reference.state_dict()) - {"encoder.embed_tokens.weight"}
    assert {n for n, _ in encoder.parameters_and_names()} == hf_keys
    ids, mask = _inputs(CONFIGS[name]["vocab_size"])
    _assert_close(_ours(encoder, ids, mask), _reference(reference, ids, mask))


def test_mask_and_default_mask():
    """Padding never changes the real tokens' outputs; no mask means attend everywhere."""
    reference = _hf_encoder("v1.1", seed=1)
    encoder = tiny_t5_ours("v1.1")
    state = {k: v.numpy() for k, v in reference.state_dict().items() if k != "encoder.embed_tokens.weight"}
    load_into_cell(encoder, state)
    ids, mask = _inputs(256, n=1, length=30, valid=(12,))
    padded = _ours(encoder, ids, mask)
    alone = _ours(encoder, ids[:, :12], mask[:, :12])
    _assert_close(padded[:, :12], alone)
    no_mask = encoder(ms.Tensor(ids, ms.int32)).asnumpy()
    _assert_close(no_mask, _reference(reference, ids, np.ones_like(mask)))


def test_loads_sharded_safetensors_without_torch(tmp_path, monkeypatch):
    reference = _hf_encoder("wide-heads", seed=2)
    reference.save_pretrained(tmp_path, max_shard_size="20KB")
    shards = [f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]
    assert len(shards) > 2 and os.path.exists(tmp_path / "model.safetensors.index.json")
    monkeypatch.setitem(sys.modules, "torch", None)  # any `import torch` now fails
    encoder = T5Encoder.from_pretrained(tmp_path)
    monkeypatch.undo()
    ids, mask = _inputs(256)
    _assert_close(_ours(encoder, ids, mask), _reference(reference, ids, mask))


def test_loads_pytorch_bin(tmp_path):
    reference = _hf_encoder("v1.1", seed=3)
    reference.save_pretrained(tmp_path, safe_serialization=False)
    assert os.path.exists(tmp_path / "pytorch_model.bin")
    assert not any(f.endswith(".safetensors") for f in os.listdir(tmp_path))
    encoder = T5Encoder.from_pretrained(tmp_path)
    ids, mask = _inputs(256)
    _assert_close(_ours(encoder, ids, mask), _reference(reference, ids, mask))


def test_embed_tokens_key_and_full_t5_checkpoint(tmp_path):
    """The embedding may be stored as encoder.embed_tokens.weight only; decoder keys are ignored."""
    reference = _hf_encoder("v1.1", seed=4)
    reference.save_pretrained(tmp_path / "a")
    state = dict(read_safetensors(str(tmp_path / "a" / "model.safetensors")))
    state["encoder.embed_tokens.weight"] = state.pop("shared.weight")
    save_safetensors(state, str(tmp_path / "a" / "model.safetensors"))
    ids, mask = _inputs(256)
    _assert_close(_ours(T5Encoder.from_pretrained(tmp_path / "a"), ids, mask), _reference(reference, ids, mask))

    tiny_t5_variant("v1.1", seed=5, full=True).save_pretrained(tmp_path / "full")
    keys = read_safetensors(str(tmp_path / "full" / "model.safetensors")).keys()
    assert any(k.startswith("decoder.") for k in keys)
    expected = _reference(T5EncoderModel.from_pretrained(tmp_path / "full").eval(), ids, mask)
    _assert_close(_ours(T5Encoder.from_pretrained(tmp_path / "full"), ids, mask), expected)


@pytest.mark.parametrize("torch_dtype,ms_dtype", [(torch.bfloat16, ms.bfloat16), (torch.float16, ms.float16)])
def test_half_precision_checkpoint_stays_half(tmp_path, torch_dtype, ms_dtype):
    """A bf16/fp16 checkpoint keeps its projections half in memory and computes in fp32.

    Tolerance 1e-4: compared with transformers in fp32 on the same (rounded) weights.
    """
    _hf_encoder("wide-heads", seed=6).to(torch_dtype).save_pretrained(tmp_path)
    encoder = T5Encoder.from_pretrained(tmp_path)
    for name, param in encoder.parameters_and_names():
        linear = any(k in name for k in LINEAR_NAMES)
        assert param.dtype == (ms_dtype if linear else ms.float32), name
    reference = T5EncoderModel.from_pretrained(tmp_path, torch_dtype=torch.float32).eval()
    ids, mask = _inputs(256)
    _assert_close(_ours(encoder, ids, mask), _reference(reference, ids, mask))


def test_fp32_checkpoint_stored_as_fp16(tmp_path):
    """weight_dtype=float16 halves an fp32 checkpoint; equals fp32 compute on fp16-rounded projections."""
    reference = _hf_encoder("v1.1", seed=7)
    reference.save_pretrained(tmp_path)
    encoder = T5Encoder.from_pretrained(tmp_path, weight_dtype=ms.float16)
    assert encoder.encoder.block[1].layer[1].DenseReluDense.wo.weight.dtype == ms.float16
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if any(k in name for k in LINEAR_NAMES):
                p.copy_(p.half().float())
    ids, mask = _inputs(256)
    _assert_close(_ours(encoder, ids, mask), _reference(reference, ids, mask))


def test_bf16_projections_upcast_by_fast_kernel(tmp_path):
    """On CPU, bf16-stored projections are upcast by the custom kernel: the same values as
    MindSpore's Cast (so the same outputs, bitwise), about 10× faster (bench_t5_cast.py)."""
    reference = _hf_encoder("v1.1", seed=11)
    reference.to(torch.bfloat16).save_pretrained(tmp_path)
    encoder = T5Encoder.from_pretrained(tmp_path)
    linears = [c for _, c in encoder.cells_and_names() if isinstance(c, Linear)]
    assert len(linears) == 2 * 7 and all(c.weight.dtype == ms.bfloat16 and c.upcast is not None for c in linears)
    ids, mask = _inputs(256)
    fast = _ours(encoder, ids, mask)
    for cell in linears:
        cell.upcast = None  # MindSpore's Cast
    np.testing.assert_array_equal(fast, _ours(encoder, ids, mask))
    reference = T5EncoderModel.from_pretrained(tmp_path, torch_dtype=torch.float32).eval()
    _assert_close(fast, _reference(reference, ids, mask))




@pytest.mark.parametrize("checkpoint_dtype", [torch.float32, torch.bfloat16])
def test_use_bf16_gemm_matches_transformers(tmp_path, checkpoint_dtype, monkeypatch):
    """use_bf16_gemm=True: the projections become bf16 GEMMs (bf16 weights and inputs, fp32 sums).

    Against transformers in fp32 with the same bf16 rounding of every linear's operands: equal up
    to the few inputs whose bf16 rounding flips with the summation order (measured ≤ 1.8e-3
    relative; one bf16 ulp is 3.9e-3). Against transformers in bf16 (bf16 activations everywhere,
    itself up to 8% off fp32 on these tiny random models): within 5%, and closer to fp32 than it."""
    monkeypatch.setenv("PIXART_BF16_GEMM", "emulate")  # the bf16 layers on CPUs without bf16 instructions too
    _hf_encoder("wide-heads", seed=12).to(checkpoint_dtype).save_pretrained(tmp_path)
    encoder = T5Encoder.from_pretrained(tmp_path, use_bf16_gemm=True)
    names = {n for n, _ in encoder.parameters_and_names()}
    layers = [c for _, c in encoder.cells_and_names() if isinstance(c, Bf16Linear)]
    assert len(layers) == 3 * 7 and not any(isinstance(c, Linear) for _, c in encoder.cells_and_names())
    assert all(c.weight.dtype == ms.bfloat16 for c in layers)
    assert names == {n for n, _ in encoder.parameters_and_names()}
    # v1.1's gated GELU: wi_0, wi_1 and the gating in one kernel (Bf16GatedFeedForward)
    assert sum(isinstance(c, Bf16GatedFeedForward) for _, c in encoder.cells_and_names()) == 3
    ids, mask = _inputs(256)
    out = _ours(encoder, ids, mask)
    exact = _reference(with_bf16_rounded_linears(T5EncoderModel.from_pretrained(tmp_path, torch_dtype=torch.float32).eval()),
                       ids, mask)
    rel = lambda a, b: np.abs(a - b).max() / np.abs(b).max()  # noqa: E731
    assert rel(out, exact) <= 4e-3
    bf16 = _reference(T5EncoderModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16).eval(), ids, mask)
    fp32 = _reference(T5EncoderModel.from_pretrained(tmp_path, torch_dtype=torch.float32).eval(), ids, mask)
    assert rel(out, bf16) <= 5e-2
    assert rel(out, fp32) < rel(bf16, fp32)


def test_fp16_compute(tmp_path):
    """dtype=float16 runs on CPU (with transformers' overflow clamp); lossy, so a loose bound:
    outputs are O(5) here and fp16 keeps ~3 decimal digits."""
    reference = _hf_encoder("v1.1", seed=9)
    reference.save_pretrained(tmp_path)
    encoder = T5Encoder.from_pretrained(tmp_path, dtype=ms.float16)
    ids, mask = _inputs(256)
    out = _ours(encoder, ids, mask)
    assert out.dtype == np.float16
    _assert_close(out.astype(np.float32), _reference(reference, ids, mask), atol=3e-2)


# ----------------------------------------------------------------------------- encoder errors


def _write_config(folder, **overrides):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "config.json", "w") as f:
        json.dump({**CONFIGS["v1.1"], "model_type": "t5", **overrides}, f)


def test_missing_folder_config_and_weights(tmp_path):
    with pytest.raises(CheckpointError) as err:
        T5Encoder.from_pretrained(tmp_path / "nope")
    _assert_one_line(err, "does not exist", "text_encoder/", HINT)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError) as err:
        T5Encoder.from_pretrained(tmp_path / "empty")
    _assert_one_line(err, "config.json is missing", "text_encoder/", HINT)
    _write_config(tmp_path / "noweights")
    with pytest.raises(CheckpointError) as err:
        T5Encoder.from_pretrained(tmp_path / "noweights")
    _assert_one_line(err, "no weights", "model.safetensors", HINT)


@pytest.mark.parametrize("overrides,needle", [
    (dict(d_model=48), "mis-shaped"),  # weights from another size
    (dict(num_layers=3), "missing"),  # config promises a block the file lacks
    (dict(feed_forward_proj="relu"), "missing"),  # wi vs wi_0/wi_1
])
def test_config_that_does_not_fit_the_weights(tmp_path, overrides, needle):
    _hf_encoder("v1.1").save_pretrained(tmp_path)
    _write_config(tmp_path, **overrides)
    with pytest.raises(CheckpointError) as err:
        T5Encoder.from_pretrained(tmp_path)
    _assert_one_line(err, needle, "config.json")


@pytest.mark.parametrize("overrides", [dict(num_heads=0), dict(d_kv="64"), dict(feed_forward_proj="gated-foo"),
                                       dict(feed_forward_proj="relu-gelu"), dict(model_type="bert"),
                                       dict(layer_norm_epsilon=-1.0)])
def test_invalid_config(tmp_path, overrides):
    _write_config(tmp_path, **overrides)
    with pytest.raises(ConfigError) as err:
        T5Encoder.from_pretrained(tmp_path)
    _assert_one_line(err, "T5")


def test_unreadable_config(tmp_path):
    tmp_path.joinpath("config.json").write_text("{not json")
    with pytest.raises(ConfigError) as err:
        T5Encoder.from_pretrained(tmp_path)
    _assert_one_line(err, "config.json")


# ----------------------------------------------------------------------------- tokenizer

WORDS = ("a small cactus with happy face in the sahara desert cat dog sitting on red blue green chair under "
         "tree painting of mountain lake sunset city night photo portrait old man woman bright colorful "
         "ocean waves forest snow winter summer castle robot astronaut riding horse bicycle street market "
         "flowers garden watercolor oil sketch cinematic lighting detailed").split()

PROMPTS = [
    "A small Cactus with a happy face in the Sahara desert.",
    "  An astronaut riding a horse, cinematic lighting, oil painting of a mountain lake at sunset, "
    "detailed watercolor sketch of the old castle garden with flowers   ",
    "cat",
]

# Captions that exercise every rule of the cleaner.
MESSY = [
    "A <b>Cat</b> on https://example.com/cat.png and www.cats.org/page &amp; &quot;friends&quot;",
    "@someone check #123 this-is-my-cute-cat_under_a_tree 192.168.0.1 IMG_2024.jpg",
    "“Quoted” ‘text’ — with ***SALE*** [50%] {x} | a/b \\n new-line 12:34   ",
    "FREE SHIPPING! click for details page 12 download free jc6640 jc6640vc 6640vc231 j2d1a2a 1920x1080",
    "汉字 and かな ㈱ text... , yes: ok ; 'wrapped'",
    "<person> at the beach %20 with %E2%9C%93 and ...dots",
    ".hidden",
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A T5Tokenizer folder around a tiny sentencepiece unigram model (pad 0, </s> 1, <unk> 2)."""
    folder = tmp_path_factory.mktemp("tokenizer")
    make_tokenizer(folder, words=WORDS)
    return folder


@pytest.fixture
def diffusers_pipeline():
    """diffusers' PixArt-α pipeline object, only for its (self-contained) text preprocessing."""
    from diffusers.pipelines.pixart_alpha import pipeline_pixart_alpha as module

    return module.PixArtAlphaPipeline.__new__(module.PixArtAlphaPipeline)


@pytest.fixture
def caption_backends(monkeypatch):
    """Make sure ftfy/bs4 are importable for both sides: the real packages when installed, else
    minimal stand-ins given to diffusers and to us alike, so the regex logic is still compared."""
    if tokenizer_module.caption_cleaning_available():
        return "real"
    from html.parser import HTMLParser

    from diffusers.pipelines.pixart_alpha import pipeline_pixart_alpha as module

    class _Text(HTMLParser):
        def __init__(self, markup, features=None):
            super().__init__(convert_charrefs=True)
            self.parts = []
            self.feed(markup)
            self.close()
            self.text = "".join(self.parts)

        def handle_data(self, data):
            self.parts.append(data)

    ftfy = types.SimpleNamespace(fix_text=lambda text: text)
    bs4 = types.SimpleNamespace(BeautifulSoup=_Text)
    monkeypatch.setitem(sys.modules, "ftfy", ftfy)
    monkeypatch.setitem(sys.modules, "bs4", bs4)
    monkeypatch.setattr(tokenizer_module, "caption_cleaning_available", lambda: True)
    monkeypatch.setattr(module, "ftfy", ftfy, raising=False)
    monkeypatch.setattr(module, "BeautifulSoup", _Text, raising=False)
    monkeypatch.setattr(module, "is_bs4_available", lambda: True)
    monkeypatch.setattr(module, "is_ftfy_available", lambda: True)
    return "stand-in"


@pytest.mark.parametrize("clean", [True, False])
def test_preprocessing_matches_diffusers(diffusers_pipeline, caption_backends, clean):
    texts = MESSY + PROMPTS
    expected = diffusers_pipeline._text_preprocessing(texts, clean_caption=clean)
    assert preprocess_text(texts, clean_caption=clean) == expected
    assert preprocess_text(texts[0], clean_caption=clean) == expected[:1]  # a single str
    if clean:
        assert expected != [t.lower().strip() for t in texts]  # the cleaner really ran


def test_clean_caption_falls_back_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(tokenizer_module, "caption_cleaning_available", lambda: False)
    monkeypatch.setattr(tokenizer_module, "_warned_no_cleaner", False)
    with caplog.at_level(logging.WARNING, logger=tokenizer_module.__name__):
        first = preprocess_text(MESSY, clean_caption=True)
        second = preprocess_text(["  Hello World "], clean_caption=True)
    assert first == [t.lower().strip() for t in MESSY] and second == ["hello world"]
    warnings = [r for r in caplog.records if "ftfy" in r.getMessage()]
    assert len(warnings) == 1 and "beautifulsoup4" in warnings[0].getMessage()


@pytest.mark.parametrize("max_length", [6, 40])
@pytest.mark.parametrize("clean", [True, False])
def test_tokenize_matches_transformers(tokenizer_dir, diffusers_pipeline, caption_backends, max_length, clean,
                                       caplog):
    ours = PromptTokenizer.from_pretrained(tokenizer_dir)
    reference = T5Tokenizer.from_pretrained(tokenizer_dir)
    texts = diffusers_pipeline._text_preprocessing(PROMPTS + MESSY[:2], clean_caption=clean)
    expected = reference(texts, padding="max_length", max_length=max_length, truncation=True,
                         add_special_tokens=True, return_tensors="np")
    with caplog.at_level(logging.WARNING, logger=tokenizer_module.__name__):
        ids, mask = ours.tokenize(PROMPTS + MESSY[:2], max_length=max_length, clean_caption=clean)
    assert ids.dtype == np.int32 and mask.dtype == np.int32 and ids.shape == (5, max_length)
    np.testing.assert_array_equal(ids, expected["input_ids"])
    np.testing.assert_array_equal(mask, expected["attention_mask"])
    assert (ids[mask == 0] == 0).all()  # <pad>
    if max_length == 6:  # the long prompt is cut, keeping </s>, and a warning says so
        assert ids[1, -1] == 1 and mask[1].all()
        assert any("truncated" in r.getMessage() for r in caplog.records)
    else:  # short prompts are padded
        assert mask[2].sum() < max_length


def test_encode_prompts_matches_transformers_pipeline(tokenizer_dir, tmp_path):
    reference = _hf_encoder("v1.1", seed=8)
    reference.save_pretrained(tmp_path)
    encoder = T5Encoder.from_pretrained(tmp_path)
    tokenizer = PromptTokenizer.from_pretrained(tokenizer_dir)
    embeds, mask = encode_prompts(tokenizer, encoder, PROMPTS[:2], max_length=24, clean_caption=False)
    assert embeds.shape == (2, 24, 32) and mask.shape == (2, 24) and mask.dtype == ms.int32
    hf = T5Tokenizer.from_pretrained(tokenizer_dir)([p.lower().strip() for p in PROMPTS[:2]], padding="max_length",
                                                   max_length=24, truncation=True, return_tensors="np")
    np.testing.assert_array_equal(mask.asnumpy(), hf["attention_mask"])
    _assert_close(embeds.asnumpy(), _reference(reference, hf["input_ids"], hf["attention_mask"]))


def test_tokenizer_errors(tmp_path, tokenizer_dir):
    with pytest.raises(CheckpointError) as err:
        PromptTokenizer.from_pretrained(tmp_path / "nope")
    _assert_one_line(err, "does not exist", "tokenizer/", HINT)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError) as err:
        PromptTokenizer.from_pretrained(tmp_path / "empty")
    _assert_one_line(err, "spiece.model is missing", "tokenizer/", HINT)
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in os.listdir(tokenizer_dir):
        (broken / f).write_bytes((tokenizer_dir / f).read_bytes())
    (broken / "spiece.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(CheckpointError) as err:
        PromptTokenizer.from_pretrained(broken)
    _assert_one_line(err, "cannot load the T5 tokenizer", HINT)
