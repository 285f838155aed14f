"""demo.py as a person uses it: a real server on a tiny model, driven by headless Chromium.

One server (a subprocess on a free localhost port) serves every test in this file; it is stopped
in teardown whatever happens. The browser is Debian's chromium through Playwright (tests/browser.py);
without it, or without gradio, these tests fail and name tools/install_test_browser.sh.
"""
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass

import numpy as np
import pytest
from PIL import Image

from browser import chromium, require
from tiny_models import make_pipeline_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 2  # few steps: the tests check the page and the server, not the picture
START_TIMEOUT_S = 180
IMAGE_TIMEOUT_MS = 120_000


# ------------------------------------------------------------------------------ without a server


def test_parser_binds_localhost_by_default_and_reads_sample_configs():
    from demo import build_parser
    from pixart.utils.config import parse_args_with_config

    config = os.path.join(ROOT, "configs/inference/pixart-sigma-1024-MS.yaml")
    args = parse_args_with_config(build_parser(), ["-c", config, "--port", "7000"])
    assert (args.host, args.port, args.share) == ("127.0.0.1", 7000, False)
    assert (args.sampling_method, args.sampling_steps, args.image_size) == ("dpm", 20, 1024)


@pytest.mark.parametrize("argv,message", [
    (["--sampling_steps", "30", "--max_steps", "20"], "--sampling_steps 30 is above --max_steps 20"),
])
def test_conflicting_options_stop_before_loading(argv, message, tmp_path):
    from demo import main
    from pixart.utils.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        main(["--pretrained_path", str(tmp_path), *argv])


FORM = dict(prompt="a cat", negative_prompt="", size="256x256", width=96, height=64, sampler="dpm", steps=2,
            guidance_scale=4.5, seed=3, randomize_seed=False)


@pytest.mark.parametrize("change,message", [
    (dict(prompt="  "), "Enter a prompt."),
    (dict(size="100x100"), "is not one of this model's sizes"),
    (dict(size="custom", width=100), "width must be a multiple of 8"),
    (dict(size="custom", height=None), "height must be a multiple of 8"),
    (dict(steps=0), "steps must be a whole number from 1 to 50"),
    (dict(steps=51), "steps must be a whole number from 1 to 50"),
    (dict(guidance_scale=30.0), "guidance scale must be between 1 and 20"),
    (dict(seed=-1), "seed must be a whole number"),
    (dict(sampler="euler"), "sampler must be one of"),
])
def test_bad_form_values_are_refused_with_a_message(change, message):
    from demo import parse_request
    from pixart.utils.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_request(dict(FORM, **change), {"256x256"}, ["dpm", "ddim"], max_steps=50)


def test_a_good_form_becomes_a_request():
    from demo import parse_request

    req = parse_request(dict(FORM, size="custom", prompt=" a cat "), {"256x256"}, ["dpm"], max_steps=50)
    assert (req.prompt, req.width, req.height, req.steps, req.seed) == ("a cat", 96, 64, 2, 3)
    assert 0 <= parse_request(dict(FORM, randomize_seed=True, seed=None), {"256x256"}, ["dpm"], 50).seed < 2**32


# ------------------------------------------------------------------------------ the server


@dataclass
class Server:
    url: str
    port: int
    process: subprocess.Popen
    log_path: str
    model: str

    def log(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_serving(server):
    deadline = time.time() + START_TIMEOUT_S
    while time.time() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"demo.py exited with {server.process.returncode}:\n{server.log()[-3000:]}")
        try:
            with urllib.request.urlopen(server.url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"demo.py did not serve within {START_TIMEOUT_S}s:\n{server.log()[-3000:]}")


def stop(process):
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    require("gradio", "playwright")  # before the slow part, so that a missing install fails at once
    return make_pipeline_folder(tmp_path_factory.mktemp("pipe"), "sigma", sample_size=32)


@pytest.fixture(scope="module")
def server(folder, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    port = free_port()
    # No --host: the default must be this machine only. gradio's file cache goes to the test's folder.
    env = dict(os.environ, GRADIO_TEMP_DIR=str(tmp / "gradio"))
    command = [sys.executable, os.path.join(ROOT, "demo.py"), "--pretrained_path", str(folder), "--mode", "pynative",
               "--sampling_steps", str(STEPS), "--port", str(port)]
    with open(tmp / "server.log", "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    server = Server(f"http://127.0.0.1:{port}/", port, process, str(tmp / "server.log"), folder.name)
    try:
        wait_until_serving(server)
        yield server
    finally:
        stop(process)


@pytest.fixture(scope="module")
def browser(server):
    with chromium() as browser:
        yield browser


# ------------------------------------------------------------------------------ page helpers


def open_page(browser, server):
    """A page in its own browser context (its own session), recording every host it contacts."""
    page = browser.new_context(accept_downloads=True, viewport={"width": 1280, "height": 1000}).new_page()
    page.hosts = set()
    page.on("request", lambda request: page.hosts.add(request.url.split("/")[2]))
    # networkidle: gradio has fetched its config, styles and translations and drawn the form for good,
    # so what the test types is not overwritten by a late first render.
    page.goto(server.url, wait_until="networkidle")
    page.wait_for_selector("#generate")
    return page


def choose_size(page, label):
    page.locator("#size input").click()
    page.get_by_role("option", name=re.compile(rf"^\W*{re.escape(label)}$")).click()


def fill(page, prompt, negative="", size=None, width=None, height=None, seed=None, randomize=False):
    type_into(page.locator("#prompt textarea"), prompt)
    type_into(page.locator("#negative textarea"), negative)
    if size:
        choose_size(page, size)
    if width is not None:
        type_into(page.locator("#width input"), str(width))
        type_into(page.locator("#height input"), str(height))
    if seed is not None:
        type_into(page.locator("#seed input"), str(seed))
    if randomize:
        page.locator("#randomize input").check()


def type_into(field, text):
    from playwright.sync_api import expect

    field.fill(text)
    expect(field).to_have_value(text)


def image_src(page):
    img = page.locator("#image img")
    return img.get_attribute("src") if img.count() else None


def click_generate(page):
    """Press Generate; returns the image's previous address, to tell the new image from it."""
    previous = image_src(page)
    page.locator("#generate").click()
    return previous


def wait_for_image(page, previous=None):
    """The new image's (natural width, natural height), once it has loaded in the page."""
    page.wait_for_function(
        """previous => { const img = document.querySelector('#image img');
                         return img && img.src !== previous && img.complete && img.naturalWidth > 0; }""",
        arg=previous, timeout=IMAGE_TIMEOUT_MS)
    return tuple(page.evaluate("() => { const i = document.querySelector('#image img');"
                               " return [i.naturalWidth, i.naturalHeight]; }"))


def settings(page):
    """The settings shown beside the image (gr.JSON renders them as JSON text)."""
    text = page.locator("#settings").inner_text()
    return json.loads(text[text.index("{"):text.rindex("}") + 1])


def error_toast(page, fragment):
    toast = page.locator(".toast-body", has_text=fragment)
    toast.wait_for(state="visible", timeout=30_000)
    return toast.inner_text()


def run_sample(folder, out, *args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--pretrained_path", str(folder),
                           "--mode", "pynative", "--output_path", str(out), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)


# ------------------------------------------------------------------------------ the tests


def test_serves_on_localhost_only(server):
    """The old demo listened on 0.0.0.0; the default is now 127.0.0.1 (from the kernel's socket table)."""
    listening = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for row in f.readlines()[1:]:
                local, state = row.split()[1], row.split()[3]
                address, port = local.split(":")
                if state == "0A" and int(port, 16) == server.port:  # 0A: LISTEN
                    listening.add(address)
    assert listening == {"0100007F"}  # 127.0.0.1, little-endian hex


def test_custom_size_image_with_settings_and_png_metadata(server, browser, folder, tmp_path):
    page = open_page(browser, server)
    fill(page, "a red car", negative="blurry", size="custom width and height", width=96, height=64, seed=3)
    assert wait_for_image(page, click_generate(page)) == (96, 64)
    expected = {"prompt": "a red car", "negative_prompt": "blurry", "seed": 3, "steps": STEPS,
                "guidance_scale": 4.5, "sampler": "dpm", "size": "96x64", "model": server.model}
    shown = settings(page)
    assert {k: shown[k] for k in expected} == expected

    # The download button saves the PNG with the same text fields sample.py writes.
    with page.expect_download() as download:
        page.locator("#image button[aria-label=Download]").click()
    image = Image.open(download.value.path())
    assert image.size == (96, 64)
    assert image.text == {k: str(v) for k, v in expected.items()}

    # The same settings through sample.py give the same picture: a seed found on the page reproduces.
    result = run_sample(folder, tmp_path, "--prompt", "a red car", "--negative_prompt", "blurry", "--seed", 3,
                        "--sampling_steps", STEPS, "--image_width", 96, "--image_height", 64)
    assert result.returncode == 0, result.stderr
    np.testing.assert_array_equal(np.asarray(image.convert("RGB")),
                                  np.asarray(Image.open(tmp_path / "00000.png").convert("RGB")))

    # The page works offline: everything it loaded came from the demo's own server.
    assert page.hosts == {f"127.0.0.1:{server.port}"}
    page.context.close()


def test_bin_size_and_randomised_seed(server, browser):
    page = open_page(browser, server)
    fill(page, "a boat on the river", size="320 × 192", randomize=True)
    assert not page.locator("#width input").is_visible()  # custom fields only for a custom size
    assert wait_for_image(page, click_generate(page)) == (320, 192)
    shown = settings(page)
    assert shown["size"] == "320x192" and shown["prompt"] == "a boat on the river"
    # The seed that was drawn is shown, in the settings and in the seed field, to make it again.
    assert page.locator("#seed input").input_value() == str(shown["seed"])
    page.context.close()


def test_five_concurrent_pages_all_get_their_image(server, browser):
    pages = [open_page(browser, server) for _ in range(5)]
    prompts = [f"a {colour} house" for colour in ("red", "blue", "green", "small", "large")]
    for page, prompt, seed in zip(pages, prompts, range(5)):
        fill(page, prompt, seed=seed)
    started = time.time()
    previous = [click_generate(page) for page in pages]  # five presses within a moment
    # The last request waits behind four others: its image area shows the queue or the progress.
    status = pages[-1].locator("#image [data-testid=status-tracker]")
    status.filter(has_text=re.compile(r"queue|encoding|denoising")).wait_for(state="visible", timeout=30_000)
    for page, prompt, seed, before in zip(pages, prompts, range(5), previous):
        assert wait_for_image(page, before) == (256, 256)
        shown = settings(page)
        assert (shown["prompt"], shown["seed"]) == (prompt, seed)
    print(f"5 concurrent requests done in {time.time() - started:.1f}s")
    for page in pages:
        page.context.close()


def test_bad_input_shows_a_message_and_the_server_keeps_serving(server, browser):
    page = open_page(browser, server)
    fill(page, "")
    click_generate(page)
    assert "Enter a prompt." in error_toast(page, "Enter a prompt.")

    fill(page, "a dog", size="custom width and height", width=100, height=64)
    click_generate(page)
    error_toast(page, "width must be a multiple of 8 between 8 and 8192, got 100")
    assert image_src(page) is None  # nothing was generated

    fill(page, "a dog", width=64, height=64, seed=5)
    assert wait_for_image(page, click_generate(page)) == (64, 64)
    page.context.close()


def test_api_refuses_out_of_range_steps_and_keeps_serving(server, tmp_path):
    from gradio_client import Client

    client = Client(server.url, verbose=False, download_files=str(tmp_path))
    form = ["a cat", "", "256x256", 96, 64, "dpm", 0, 4.5, 1, False, None, None, 0.8]  # no init image: text-to-image
    # gradio's slider refuses it before demo.py's own check (same range) would.
    with pytest.raises(Exception, match=r"less than minimum value 1|steps must be a whole number from 1 to 200"):
        client.predict(*form, api_name="/generate")
    form[6] = STEPS
    path, shown, seed = client.predict(*form, api_name="/generate")
    assert Image.open(path).size == (256, 256) and (shown["steps"], seed) == (STEPS, 1)
    assert server.process.poll() is None
    assert "generation failed" not in server.log()  # refused inputs never reach the pipeline


def test_api_img2img_with_a_mask(server, folder, tmp_path):
    """The form's optional init image, mask and strength reach the pipeline (img2img / inpainting)."""
    from gradio_client import Client, handle_file

    from pixart import PixArtSigmaPipeline

    yy, xx = np.mgrid[0:64, 0:96] / 64.0
    init = np.stack([0.5 + 0.4 * np.sin(3 * xx), 0.5 + 0.4 * np.cos(2 * yy + xx), 0.3 + 0.3 * yy], axis=-1)
    Image.fromarray((init * 255).astype(np.uint8)).save(tmp_path / "init.png")
    mask = np.zeros((64, 96), np.uint8)
    mask[16:48, 16:48] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    client = Client(server.url, verbose=False, download_files=str(tmp_path / "got"))
    form = ["a cat", "", "custom", 96, 64, "dpm", STEPS, 4.5, 2, False,
            handle_file(str(tmp_path / "init.png")), handle_file(str(tmp_path / "mask.png")), 0.5]
    path, shown, seed = client.predict(*form, api_name="/generate")
    assert (shown["init_image"], shown["mask_image"], shown["strength"], seed) == ("init.png", "mask.png", 0.5, 2)
    pipe = PixArtSigmaPipeline.from_pretrained(str(folder))
    want = pipe("a cat", image=str(tmp_path / "init.png"), mask_image=str(tmp_path / "mask.png"), strength=0.5,
                seed=2, num_inference_steps=STEPS, height=64, width=96, progress=False).images[0]
    np.testing.assert_array_equal(np.asarray(Image.open(path)), np.asarray(want))
