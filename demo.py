"""Web demo: type a prompt, press Generate, see the picture.

    python demo.py -c configs/inference/pixart-sigma-1024-MS.yaml [--pretrained_path DIR | --checkpoint FILE] \
        [--host 127.0.0.1] [--port 7788]

then open http://127.0.0.1:7788. The options (and YAML keys) are sample.py's, where they set the
form's defaults (prompt, size, sampler, steps, guidance, seed), plus the server options below. The
model loads once, at start; requests wait in a queue and run one at a time. The page works offline:
no analytics, no share link unless asked, system fonts instead of web fonts.
"""
import os

# Before gradio is imported: it reads this at import time (no usage statistics, no version check).
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import logging  # noqa: E402
import random  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass  # noqa: E402


from pixart.cli import DEFAULT_PROMPT, check_side, parse_args_with_config, sample_parser, str2bool  # noqa: E402
from pixart.pipelines.config import PipelineConfig  # noqa: E402
from pixart.pipelines.images import save_png  # noqa: E402
from pixart.utils.device import set_device  # noqa: E402
from pixart.utils.errors import ConfigError, PixArtError, run_cli  # noqa: E402

CUSTOM = "custom"
MAX_SEED = 2**32 - 1
GUIDANCE_RANGE = (1.0, 20.0)  # 1 turns classifier-free guidance off
KEEP_PNG_S = 600  # our copy of each PNG; gradio keeps its own copy for the page and the download

logger = logging.getLogger("demo")


def build_parser():
    """sample.py's options (so the same YAML configs load) plus the server's."""
    p = sample_parser()
    p.prog = "demo.py"
    p.description = "PixArt text-to-image web demo"
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: this machine only; 0.0.0.0 opens it to the network)")
    g.add_argument("--port", type=int, default=7788)
    g.add_argument("--share", type=str2bool, default=False,
                   help="also open a public gradio.live link (needs internet; off by default)")
    g.add_argument("--queue_size", type=int, default=32, help="requests waiting beyond this are turned away")
    g.add_argument("--max_steps", type=int, default=200, help="the largest step count a request may ask for")
    g.add_argument("--low_memory", type=str2bool, default=False,
                   help="never hold T5 and the DiT in memory together: every request loads T5, encodes the "
                        "prompt, frees T5 and loads the DiT again (slower requests; for machines that cannot hold "
                        "both: T5-XXL takes 9.5 GB from bf16 files, 19 GB fp32)")
    return p


# ---------------------------------------------------------------------------------- requests


@dataclass
class Request:
    prompt: str
    negative_prompt: str
    width: int
    height: int
    sampler: str
    steps: int
    guidance_scale: float
    seed: int
    init_image: str = None   # img2img / inpainting (pixart.pipelines.img2img); None: text-to-image
    mask_image: str = None
    strength: float = None
    control_image: object = None  # with --controlnet: (H, W, 3) uint8; the image then takes its size
    control_scale: float = 1.0


def size_label(width, height):
    return f"{width}x{height}"


def size_choices(bins):
    """Dropdown choices (label, value) for the model's aspect-ratio bins, tallest first, then custom."""
    sizes = sorted({(w, h) for h, w in bins.values()}, key=lambda wh: wh[0] / wh[1])
    choices = [(f"{w} × {h}", size_label(w, h)) for w, h in sizes]
    return choices + [("custom width and height", CUSTOM)]


def parse_request(form, allowed_sizes, samplers, max_steps):
    """Check one form submission; every problem is a ConfigError whose message the page shows."""
    prompt = (form["prompt"] or "").strip()
    if not prompt:
        raise ConfigError("Enter a prompt.")
    if form["size"] == CUSTOM:
        width, height = check_side("width", form["width"], flag=False), check_side("height", form["height"], flag=False)
    elif form["size"] in allowed_sizes:
        width, height = map(int, form["size"].split("x"))
    else:
        raise ConfigError(f"size {form['size']!r} is not one of this model's sizes; pick one or choose custom")
    if form["sampler"] not in samplers:
        raise ConfigError(f"sampler must be one of {', '.join(samplers)}, got {form['sampler']!r}")
    steps = form["steps"]
    if steps is None or steps != int(steps) or not 1 <= steps <= max_steps:
        raise ConfigError(f"steps must be a whole number from 1 to {max_steps}, got {steps}")
    guidance = form["guidance_scale"]
    if guidance is None or not GUIDANCE_RANGE[0] <= guidance <= GUIDANCE_RANGE[1]:
        raise ConfigError(f"guidance scale must be between {GUIDANCE_RANGE[0]:g} and {GUIDANCE_RANGE[1]:g}, "
                          f"got {guidance}")
    seed = random.randint(0, MAX_SEED) if form["randomize_seed"] else form["seed"]
    if seed is None or seed != int(seed) or not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"seed must be a whole number from 0 to {MAX_SEED}, got {seed}")
    init_image, mask_image, strength = form.get("init_image"), form.get("mask_image"), form.get("strength")
    if mask_image and not init_image:
        raise ConfigError("A mask needs an init image.")
    if init_image:  # the pipeline's own checks (strength in [0, 1], the mask's size, a readable image)
        from pixart.pipelines.img2img import check_image_inputs
        strength = check_image_inputs(init_image, mask_image or None, strength).strength
    control = {}
    if "control_image" in form:  # the demo runs a ControlNet (--controlnet)
        from pixart.models.controlnet import check_conditioning_scale

        if form["control_image"] is None:
            raise ConfigError("Upload a control image (e.g. an edge map): this demo runs a ControlNet.")
        control = dict(control_image=form["control_image"],
                       control_scale=check_conditioning_scale(form["control_scale"]))
    return Request(prompt, (form["negative_prompt"] or "").strip(), width, height, form["sampler"], int(steps),
                   float(guidance), int(seed), init_image or None, (mask_image or None) if init_image else None,
                   strength if init_image else None, **control)


# ---------------------------------------------------------------------------------- the model


class Generator:
    """The pipeline, loaded once, and what one request does with it."""

    def __init__(self, args, config=None):
        from pixart.data.aspect_ratios import get_bins
        from pixart.samplers import SAMPLERS
        self.args = args
        started = time.time()
        self.config = config or PipelineConfig.from_args(args)
        # low_memory False keeps T5 beside the DiT, so that a request does not reload the text encoder.
        self.pipe = self.config.build(low_memory=args.low_memory)  # merges --lora whenever the DiT loads
        self.model_name = self.pipe.name
        self._load_components()
        self.base = self.pipe.transformer.base_size * self.pipe.transformer.patch_size * 8
        self.bins = get_bins(self.base)
        self.samplers = list(SAMPLERS)
        self.outdir = tempfile.TemporaryDirectory(prefix="pixart-demo-")
        self.count = 0
        logger.info("loaded %s (base %dpx) in %.1fs", self.model_name, self.base, time.time() - started)

    def _load_components(self):
        # Load now rather than on the first request, so that a broken file stops the start-up.
        names = ["tokenizer", "transformer", "vae"]
        if not self.pipe.low_memory:
            names.insert(1, "text_encoder")
        for name in names:
            getattr(self.pipe, name)

    def default_size(self):
        """The config's image_width/height as a bin or a custom size; the base size otherwise."""
        width, height = self.args.image_width or self.base, self.args.image_height or self.base
        label = size_label(width, height)
        return (label if label in self.allowed_sizes() else CUSTOM), width, height

    def allowed_sizes(self):
        return {size_label(w, h) for h, w in self.bins.values()}

    def __call__(self, req, on_step=None):
        """One image for a checked Request: (PIL image, the metadata fields sample.py writes)."""
        # generate() is sample.py's loop: the same seed and settings give sample.py's image
        item = next(self.pipe.generate(
            [req.prompt], seed=req.seed, negative_prompt=req.negative_prompt, guidance_scale=req.guidance_scale,
            num_inference_steps=req.steps, sampler=req.sampler,
            sampler_kwargs={"eta": self.args.ddim_eta} if req.sampler == "ddim" else None,
            height=req.height if req.control_image is None else None,  # a control image sets the size
            width=req.width if req.control_image is None else None,
            use_resolution_binning=self.args.use_resolution_binning, progress=False,
            callback=on_step, image=req.init_image, strength=req.strength if req.init_image else None,
            mask_image=req.mask_image, control_image=req.control_image,
            controlnet_conditioning_scale=req.control_scale))
        image, fields = item.image, item.fields
        return image, fields

    def save(self, image, fields):
        """Write the PNG with its metadata; the page shows this file and its download is this file."""
        self._forget_old_files()
        self.count += 1
        path = os.path.join(self.outdir.name, f"pixart_{self.count:05d}_seed{fields['seed']}.png")
        return save_png(image, path, fields)

    def _forget_old_files(self):
        # gradio copies each returned file into its own cache at once, so ours can go after a while.
        now = time.time()
        for entry in os.scandir(self.outdir.name):
            if now - entry.stat().st_mtime > KEEP_PNG_S:
                os.remove(entry.path)


# ---------------------------------------------------------------------------------- the page


def offline_theme():
    """The default look with system fonts: the stock theme pulls its fonts from Google's servers."""
    import gradio as gr

    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "Consolas", "monospace"])


FORM = ["prompt", "negative_prompt", "size", "width", "height", "sampler", "steps", "guidance_scale", "seed",
        "randomize_seed", "init_image", "mask_image", "strength"]  # the order of the page's inputs, as the generate function receives them
CONTROL_FORM = ["control_image", "control_scale"]  # after FORM, when the demo runs a ControlNet


def form_names(gen):
    return FORM + (CONTROL_FORM if gen.pipe.controlnet is not None else [])


def build_ui(gen):
    import gradio as gr

    from pixart.samplers import DEFAULT_STEPS

    args = gen.args
    size, width, height = gen.default_size()
    sampler = args.sampling_method
    with gr.Blocks(title="PixArt text-to-image", delete_cache=(3600, 3600)) as ui:
        gr.Markdown(f"## PixArt text-to-image\nModel: `{gen.model_name}` (base {gen.base}px)")
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="Prompt", value=args.prompt or DEFAULT_PROMPT, lines=3, elem_id="prompt")
                negative = gr.Textbox(label="Negative prompt", value=args.negative_prompt, elem_id="negative")
                size_box = gr.Dropdown(size_choices(gen.bins), value=size, label="Size (width × height)",
                                       elem_id="size")
                with gr.Row(visible=size == CUSTOM) as custom_row:
                    width_box = gr.Number(label="Width", value=width, step=8, precision=0, elem_id="width")
                    height_box = gr.Number(label="Height", value=height, step=8, precision=0, elem_id="height")
                with gr.Row():
                    sampler_box = gr.Dropdown(gen.samplers, value=sampler, label="Sampler", elem_id="sampler")
                    steps_box = gr.Slider(1, args.max_steps, step=1, label="Steps", elem_id="steps",
                                          value=min(args.sampling_steps or DEFAULT_STEPS[sampler], args.max_steps))
                guidance_box = gr.Slider(*GUIDANCE_RANGE, step=0.1, value=args.guidance_scale,
                                         label="Guidance scale", elem_id="guidance")
                with gr.Row():
                    seed_box = gr.Number(label="Seed", value=args.seed, precision=0, elem_id="seed")
                    randomize_box = gr.Checkbox(label="Randomise seed", value=False, elem_id="randomize")
                with gr.Accordion("Start from an image (img2img, inpainting)", open=False):
                    init_box = gr.Image(label="Init image (resized and centre-cropped to the size above)",
                                        type="filepath", sources=["upload"], elem_id="init_image")
                    mask_box = gr.Image(label="Mask, the init image's size (white = repaint)", type="filepath",
                                        sources=["upload"], elem_id="mask_image")
                    strength_box = gr.Slider(0.0, 1.0, step=0.05, value=0.8, label="Strength", elem_id="strength")
                if gen.pipe.controlnet is not None:
                    control_box = gr.Image(label="Control image (e.g. an edge map; the picture takes its size)",
                                           type="numpy", image_mode="RGB", elem_id="control_image")
                    control_scale_box = gr.Slider(0.0, 1.0, step=0.05, value=args.controlnet_conditioning_scale,
                                                  label="Control strength", elem_id="control_scale")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column():
                image_box = gr.Image(label="Image", type="filepath", format="png", interactive=False,
                                     buttons=["download", "fullscreen"], elem_id="image")
                settings_box = gr.JSON(label="Settings", elem_id="settings")

        inputs = [prompt, negative, size_box, width_box, height_box, sampler_box, steps_box, guidance_box,
                  seed_box, randomize_box, init_box, mask_box, strength_box]
        if gen.pipe.controlnet is not None:
            inputs += [control_box, control_scale_box]

        def check(*values):
            parse_or_show(gen, values)

        def generate(*values, progress=gr.Progress()):
            req = parse_or_show(gen, values)
            progress(0, desc="encoding the prompt")
            started = time.time()
            try:
                image, fields = gen(req, on_step=lambda i, t, x: progress((i + 1, req.steps), desc="denoising"))
            except PixArtError as err:
                raise gr.Error(str(err), print_exception=False) from None
            except Exception as err:  # noqa: BLE001 - the server keeps serving; the page says what failed
                logger.exception("generation failed")
                raise gr.Error(f"generation failed: {type(err).__name__}: {err}") from None
            seconds = time.time() - started
            logger.info("%s seed %d in %.1fs: %s", fields["size"], req.seed, seconds, req.prompt)
            return gen.save(image, fields), dict(fields, seconds=round(seconds, 1)), req.seed

        # The form is checked first, with no concurrency limit, so that a mistake is shown at once
        # rather than after the images ahead of it; generate checks again, for callers of the API.
        checked = gr.on([button.click, prompt.submit], check, inputs, None, concurrency_limit=None,
                        show_progress="hidden", api_visibility="private")
        # concurrency_limit=1: one image at a time (the pipeline and MindSpore's execution mode are
        # global state, not to be shared between threads); the other requests wait in the queue.
        checked.success(generate, inputs, [image_box, settings_box, seed_box], api_name="generate",
                        concurrency_limit=1, show_progress_on=[image_box])
        size_box.change(lambda choice: gr.Row(visible=choice == CUSTOM), size_box, custom_row, queue=False,
                        api_visibility="private")
        # A new sampler starts from its usual step count.
        sampler_box.change(lambda name: min(DEFAULT_STEPS[name], args.max_steps), sampler_box, steps_box,
                           queue=False, api_visibility="private")
    return ui


def parse_or_show(gen, values):
    """parse_request, with its message raised as a gr.Error, which the page shows."""
    import gradio as gr

    try:
        return parse_request(dict(zip(form_names(gen), values)), gen.allowed_sizes(), gen.samplers,
                             gen.args.max_steps)
    except PixArtError as err:
        raise gr.Error(str(err), print_exception=False) from None


def require_gradio():
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise ConfigError("the demo needs gradio: pip install -r requirements-demo.txt") from None


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio's own start-up requests, one line each
    # gradio 6.17 still names a status code that Starlette 1.x renamed: one warning per request otherwise.
    warnings.filterwarnings("ignore", message=".*HTTP_422_UNPROCESSABLE_ENTITY")
    args = parse_args_with_config(build_parser(), argv)
    config = PipelineConfig.from_args(args).check()
    for name in ("image_width", "image_height"):
        if getattr(args, name) is not None:
            check_side(name, getattr(args, name))
    require_gradio()
    if not 1 <= args.max_steps <= 1000 or args.queue_size < 1:
        raise ConfigError("--max_steps must be from 1 to 1000 and --queue_size at least 1")
    if args.sampling_steps is not None and args.sampling_steps > args.max_steps:
        raise ConfigError(f"--sampling_steps {args.sampling_steps} is above --max_steps {args.max_steps}")
    if args.controlnet:  # the control image is uploaded on the page
        from pixart.models.controlnet import check_conditioning_scale

        check_conditioning_scale(args.controlnet_conditioning_scale)
    config.check_weights()
    set_device(config.device_target)
    gen = Generator(args, config)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("listening on %s: anyone who can reach this machine can use the demo", args.host)
    ui = build_ui(gen)
    ui.queue(max_size=args.queue_size, default_concurrency_limit=1)
    ui.launch(server_name=args.host, server_port=args.port, share=args.share, theme=offline_theme(),
              footer_links=["api", "settings"], ssr_mode=False, show_error=True)


if __name__ == "__main__":
    run_cli(main)
