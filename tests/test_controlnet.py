"""ControlNet (PixArt-δ ControlNet-Transformer): parity with a PyTorch reference built on diffusers'
blocks that follows diffusers' research ``PixArtControlNetTransformerModel`` forward; the official
and diffusers-research weight layouts; a fresh branch is a no-op; wrong base models are refused."""
import json

import numpy as np
import pytest
import torch
import mindspore as ms
from diffusers.models.attention import BasicTransformerBlock
from safetensors.torch import save_file

from pixart.models.controlnet import (ControlPixArt, PixArtControlNet, load_controlnet, read_controlnet,
                                      save_controlnet)
from pixart.models.pixart_weights import from_pretrained
from pixart.utils.errors import CheckpointError, ConfigError
from tiny_models import tiny_transformer

HEAD_DIM, CAPTION, TOKENS = 8, 12, 6


# ----------------------------------------------------------------------------- the PyTorch reference


def tiny_base(heads=2, depth=4, sample_size=8, interpolation_scale=1.0, micro=False, seed=0):
    """A tiny random diffusers PixArt transformer, every weight non-zero (tiny_models.tiny_transformer)."""
    return tiny_transformer(sample_size, micro, seed, CAPTION, heads=heads, head_dim=HEAD_DIM,
                            interpolation_scale=interpolation_scale, depth=depth)


class RefControlBlock(torch.nn.Module):
    """diffusers research ``PixArtControlNetAdapterBlock`` at tiny size (same attribute names)."""

    def __init__(self, index, heads, head_dim):
        super().__init__()
        dim = heads * head_dim
        self.block_index = index
        if index == 0:
            self.before_proj = torch.nn.Linear(dim, dim)
        self.transformer_block = BasicTransformerBlock(
            dim, heads, head_dim, cross_attention_dim=dim, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
            attention_bias=True, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6)
        self.after_proj = torch.nn.Linear(dim, dim)

    def forward(self, hidden, control, encoder_hidden, timestep, encoder_mask):
        if self.block_index == 0:
            control = hidden + self.before_proj(control)
        down = self.transformer_block(control, encoder_hidden_states=encoder_hidden, timestep=timestep,
                                      encoder_attention_mask=encoder_mask)
        return self.after_proj(down), down


class RefControlNet(torch.nn.Module):
    """``PixArtControlNetAdapterModel``: ``controlnet_blocks.N.*``; random non-zero weights."""

    def __init__(self, layers, heads, seed=1):
        super().__init__()
        self.controlnet_blocks = torch.nn.ModuleList([RefControlBlock(i, heads, HEAD_DIM) for i in range(layers)])
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn_like(p) * 0.3)


def ref_forward(transformer, controlnet, x, t, y, mask, control, added=None, scale=1.0):
    """diffusers research ``PixArtControlNetTransformerModel.forward`` (+ the conditioning scale)."""
    tr = transformer
    with torch.no_grad():
        x, y, t, control = (torch.from_numpy(a) for a in (x, y, t, control))
        encoder_mask = ((1 - torch.from_numpy(mask).float()) * -10000.0).unsqueeze(1)
        batch, height, width = x.shape[0], x.shape[-2] // 2, x.shape[-1] // 2
        added = added or {"resolution": None, "aspect_ratio": None}
        hidden = tr.pos_embed(x)
        timestep, embedded = tr.adaln_single(t, added, batch_size=batch, hidden_dtype=hidden.dtype)
        encoder = tr.caption_projection(y).view(batch, -1, hidden.shape[-1])
        down = tr.pos_embed(control)
        layers = len(controlnet.controlnet_blocks)
        for index, block in enumerate(tr.transformer_blocks):
            if 0 < index <= layers:
                left, down = controlnet.controlnet_blocks[index - 1](hidden, down, encoder, timestep, encoder_mask)
                hidden = hidden + scale * left
            hidden = block(hidden, encoder_hidden_states=encoder, encoder_attention_mask=encoder_mask,
                           timestep=timestep)
        shift, scale_ = (tr.scale_shift_table[None] + embedded[:, None]).chunk(2, dim=1)
        hidden = tr.proj_out(tr.norm_out(hidden) * (1 + scale_) + shift)
        hidden = hidden.reshape(-1, height, width, 2, 2, tr.out_channels)
        hidden = torch.einsum("nhwpqc->nchpwq", hidden)
        return hidden.reshape(-1, tr.out_channels, height * 2, width * 2).numpy()


def inputs(h, w, batch=2, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 4, h, w)).astype(np.float32)
    control = rng.standard_normal((batch, 4, h, w)).astype(np.float32)
    t = np.array([999, 17, 500, 3][:batch], np.int64)
    y = rng.standard_normal((batch, TOKENS, CAPTION)).astype(np.float32)
    mask = np.ones((batch, TOKENS), np.int64)
    mask[0, 2:] = 0  # a padded prompt
    return x, t, y, mask, control


def ms_forward(net, x, t, y, mask, control, resolution=None, aspect=None, scale=1.0):
    opt = lambda a: None if a is None else ms.Tensor(a)  # noqa: E731
    return net(ms.Tensor(x), ms.Tensor(t), ms.Tensor(y), ms.Tensor(mask), opt(resolution), opt(aspect), None,
               opt(control), scale).asnumpy()


def save_research_layout(controlnet, folder):
    """The diffusers research ControlNet as saved by ``save_pretrained``: config.json + safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in controlnet.state_dict().items()},
              str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"_class_name": "PixArtControlNetAdapterModel",
                                                    "num_layers": len(controlnet.controlnet_blocks)}))
    return str(folder)


@pytest.fixture(scope="module")
def sigma(tmp_path_factory):
    """(diffusers base, reference ControlNet, our ControlPixArt loaded from the research layout, root)."""
    root = tmp_path_factory.mktemp("controlnet")
    base_ref = tiny_base()
    base_ref.save_pretrained(root / "transformer")
    control_ref = RefControlNet(layers=2, heads=2)
    path = save_research_layout(control_ref, root / "controlnet")
    base = from_pretrained(str(root / "transformer"), model_max_length=TOKENS)
    net = ControlPixArt(base, load_controlnet(path, base))
    return base_ref, control_ref, net, root


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("h,w", [(8, 8), (8, 12)])
def test_sigma_matches_the_research_reference(sigma, h, w):
    base_ref, control_ref, net, _ = sigma
    x, t, y, mask, control = inputs(h, w)
    ref = ref_forward(base_ref, control_ref, x, t, y, mask, control)
    out = ms_forward(net, x, t, y, mask, control)
    assert out.shape == (2, 8, h, w)
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)
    plain = ref_forward(base_ref, control_ref, x, t, y, mask, control, scale=0.0)
    assert np.abs(ref - plain).max() > 1e-2  # the hint changes the output


def test_alpha_ms_micro_conditions_non_square_match(tmp_path):
    """PixArt-α 1024-MS layout: micro-conditions, pe interpolation 2, a tall non-square latent."""
    base_ref = tiny_base(heads=3, sample_size=16, interpolation_scale=2.0, micro=True, seed=4)
    base_ref.save_pretrained(tmp_path / "transformer")
    control_ref = RefControlNet(layers=3, heads=3, seed=5)
    base = from_pretrained(str(tmp_path / "transformer"), model_max_length=TOKENS)
    net = ControlPixArt(base, load_controlnet(save_research_layout(control_ref, tmp_path / "cn"), base))
    x, t, y, mask, control = inputs(16, 8)
    resolution = np.array([[1024.0, 512.0]] * 2, np.float32)
    aspect = np.array([[2.0]] * 2, np.float32)
    added = {"resolution": torch.from_numpy(resolution), "aspect_ratio": torch.from_numpy(aspect)}
    ref = ref_forward(base_ref, control_ref, x, t, y, mask, control, added=added)
    np.testing.assert_allclose(ms_forward(net, x, t, y, mask, control, resolution, aspect), ref, atol=1e-4, rtol=0)


def test_conditioning_scale(sigma):
    base_ref, control_ref, net, _ = sigma
    x, t, y, mask, control = inputs(8, 12)
    half = ms_forward(net, x, t, y, mask, control, scale=0.5)
    np.testing.assert_allclose(half, ref_forward(base_ref, control_ref, x, t, y, mask, control, scale=0.5),
                               atol=1e-4, rtol=0)
    base_only = net.base_model(*(ms.Tensor(a) for a in (x, t, y, mask))).asnumpy()
    np.testing.assert_allclose(ms_forward(net, x, t, y, mask, control, scale=0.0), base_only, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(ms_forward(net, x, t, y, mask, None), base_only)


def test_graph_mode_equals_pynative(sigma):
    net = sigma[2]
    x, t, y, mask, control = inputs(8, 12)
    eager = ms_forward(net, x, t, y, mask, control)
    ms.set_context(mode=ms.GRAPH_MODE)
    graph = ms_forward(net, x, t, y, mask, control)
    np.testing.assert_allclose(graph, eager, atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", [ms.PYNATIVE_MODE, ms.GRAPH_MODE])
def test_text_context_covers_the_copied_blocks(sigma, mode):
    """ControlPixArt's ``text_context``: the base blocks' caption K/V, then the copied blocks'."""
    net = sigma[2]
    x, t, y, mask, control = inputs(8, 12)
    context = net.text_context(ms.Tensor(y))
    assert len(context) == len(net.base_model.blocks) + net.num_layers
    ms.set_context(mode=mode)
    features = ms_forward(net, x, t, y, mask, control)
    cached = net(ms.Tensor(x), ms.Tensor(t), context, ms.Tensor(mask), None, None, None, ms.Tensor(control),
                 1.0).asnumpy()
    np.testing.assert_array_equal(cached, features)


# ----------------------------------------------------------------------------- layouts


def test_official_pth_layout_loads_base_and_controlnet(sigma, tmp_path):
    """The official file: {'state_dict': {base_model.*, controlnet.N.copied_block.*, ...}} (torch pickle)."""
    base_ref, control_ref, net, _ = sigma
    state = {name: torch.from_numpy(p.asnumpy().copy()) for name, p in net.parameters_and_names()}
    state["base_model.pos_embed"] = torch.zeros(1, 16, 16)  # the original buffer, ignored
    assert "controlnet.0.copied_block.attn.qkv.weight" in state and "controlnet.0.before_proj.weight" in state
    assert "controlnet.1.after_proj.bias" in state and "controlnet.1.before_proj.weight" not in state
    path = str(tmp_path / "PixArt-XL-2-512-ControlNet.pth")
    torch.save({"state_dict": state}, path)
    base = from_pretrained(path, num_heads=2, input_size=8, pe_interpolation=1.0)  # the bundled base DiT
    control, config, bundled = read_controlnet(path)
    assert config["num_layers"] == 2 and config["model_max_length"] == TOKENS and bundled
    official = ControlPixArt(base, load_controlnet(path, base))
    x, t, y, mask, control = inputs(8, 12)
    np.testing.assert_allclose(ms_forward(official, x, t, y, mask, control),
                               ref_forward(base_ref, control_ref, x, t, y, mask, control), atol=1e-4, rtol=0)


def test_our_ckpt_round_trip_is_exact(sigma, tmp_path):
    net = sigma[2]
    branch = PixArtControlNet(net.base_model.config, 2)
    for (_, mine), (_, theirs) in zip(branch.parameters_and_names(), net.controlnet.parameters_and_names()):
        mine.set_data(theirs.copy())
    path = save_controlnet(branch, str(tmp_path / "controlnet.ckpt"))
    again = load_controlnet(path, net.base_model)
    for (name, a), (_, b) in zip(branch.parameters_and_names(), again.parameters_and_names()):
        np.testing.assert_array_equal(a.asnumpy(), b.asnumpy(), err_msg=name)


def test_fresh_controlnet_copies_the_base_and_changes_nothing(sigma):
    base = sigma[2].base_model
    fresh = PixArtControlNet.from_base(base, 3)
    params = dict(base.parameters_and_names())
    for name, p in fresh.parameters_and_names():
        if ".copied_block." in name:
            _, i, _, rest = name.split(".", 3)
            np.testing.assert_array_equal(p.asnumpy(), params[f"blocks.{i}.{rest}"].asnumpy())
        else:  # before_proj / after_proj
            assert not p.asnumpy().any(), name
    x, t, y, mask, control = inputs(8, 12)
    base_only = base(*(ms.Tensor(a) for a in (x, t, y, mask))).asnumpy()
    np.testing.assert_array_equal(ms_forward(ControlPixArt(base, fresh), x, t, y, mask, control), base_only)


# ----------------------------------------------------------------------------- bad input


def test_controlnet_for_another_base_is_refused(sigma, tmp_path):
    _, _, net, root = sigma
    wider = from_pretrained(_save(tiny_base(heads=3), tmp_path / "wide"), model_max_length=TOKENS)
    with pytest.raises(CheckpointError, match="made for a .*hidden 16.*not this .*hidden 24") as err:
        load_controlnet(str(root / "controlnet"), wider)
    assert "\n" not in str(err.value)
    # a ControlNet trained on a 120-token PixArt-α base, used with a 300-token PixArt-Σ DiT
    branch = PixArtControlNet(net.base_model.config.replace(model_max_length=120), 2)
    path = save_controlnet(branch, str(tmp_path / "alpha_controlnet.ckpt"))
    sigma_base = from_pretrained(str(root / "transformer"), model_max_length=300)
    with pytest.raises(CheckpointError, match="PixArt-α.*not this PixArt-Σ"):
        load_controlnet(path, sigma_base)
    with pytest.raises(ConfigError, match="1 to depth - 1 = 3 blocks"):
        PixArtControlNet(net.base_model.config, 4)
    with pytest.raises(CheckpointError, match="is not a PixArt ControlNet"):
        load_controlnet(str(root / "transformer"), net.base_model)


def _save(model, folder):
    model.save_pretrained(folder)
    return str(folder)
