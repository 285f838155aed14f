"""Prompt -> T5 token ids, with the caption preprocessing of diffusers' PixArt pipelines.

    prompts --preprocess_text--> cleaned strings --T5 sentencepiece--> input_ids (N, L), mask (N, L)

Padding always goes to ``max_length`` (300 for PixArt-Σ, 120 for PixArt-α) with truncation, and
the mask (1 = token, 0 = padding) is passed to T5 and to the DiT's cross-attention.

Preprocessing matches diffusers' ``_text_preprocessing``: with ``clean_caption=True`` (the pipelines'
default) and ftfy + beautifulsoup4 installed, ``clean_caption`` runs twice; otherwise the prompt is
only lower-cased and stripped, and a warning says once that the packages are missing.
"""
import html
import importlib.util
import logging
import os
import re
import urllib.parse

import numpy as np

from pixart.utils.errors import CheckpointError

logger = logging.getLogger(__name__)

HF_REPO_HINT = ("it comes from the Hugging Face repo PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers "
                "(folder tokenizer/)")

# ----------------------------------------------------------------------------- caption cleaning

# URLs with a scheme or a well-known TLD (the second pattern is the same for "www:").
_URL = r"\b((?:{}:(?:\/{{1,3}}|[a-zA-Z0-9%])|[a-zA-Z0-9.\-]+[.](?:com|co|ru|net|org|edu|gov|it)[\w/-]*\b\/?(?!@)))"

# Character runs that are only decoration in scraped captions: ***SALE***, #tag, (c), |, /...
_BAD_PUNCT = r"[#®•©™&@·º½¾¿¡§~\)\(\]\[\}\{\|\\/\*]{1,}"

# Applied after the HTML is stripped, in this order (the order matters: later patterns assume the
# earlier ones ran).
_AFTER_HTML = [
    (r"@[\w\d]+\b", ""),  # @nickname
    # CJK blocks: strokes, katakana extensions, enclosed letters, compatibility, ideographs, hexagrams
    (r"[\u31c0-\u31ef]+", ""), (r"[\u31f0-\u31ff]+", ""), (r"[\u3200-\u32ff]+", ""),
    (r"[\u3300-\u33ff]+", ""), (r"[\u3400-\u4dbf]+", ""), (r"[\u4dc0-\u4dff]+", ""),
    (r"[\u4e00-\u9fff]+", ""),
    # every kind of dash -> "-"
    (r"[\u002D\u058A\u05BE\u1400\u1806\u2010-\u2015\u2E17\u2E1A\u2E3A\u2E3B\u2E40\u301C\u3030\u30A0"
     r"\uFE31\uFE32\uFE58\uFE63\uFF0D]+", "-"),
    (r"[`´«»“”¨]", '"'), (r"[‘’]", "'"),  # quotes to one standard
    (r"&quot;?", ""), (r"&amp", ""),  # leftover entities
    (r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", " "),  # IP addresses
    (r"\d:\d\d\s+$", ""),  # article ids
    (r"\\n", " "),  # literal backslash-n
    (r"#\d{1,3}\b", ""), (r"#\d{5,}\b", ""), (r"\b\d{6,}\b", ""),  # #123, #12345.., 123456..
    (r"[\S]+\.(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)", ""),  # file names
    (r"[\"\']{2,}", r'"'), (r"[\.]{2,}", r" "),  # """SOLD OUT""", ...
    (_BAD_PUNCT, r" "),
    (r"\s+\.\s+", r" "),  # " . "
]

# Applied after ftfy and HTML unescaping: product codes, shop boilerplate, sizes, spacing.
_AFTER_FTFY = [
    (r"\b[a-zA-Z]{1,3}\d{3,15}\b", ""),  # jc6640
    (r"\b[a-zA-Z]+\d+[a-zA-Z]+\b", ""),  # jc6640vc
    (r"\b\d+[a-zA-Z]+\d+\b", ""),  # 6640vc231
    (r"(worldwide\s+)?(free\s+)?shipping", ""),
    (r"(free\s)?download(\sfree)?", ""),
    (r"\bclick\b\s(?:for|on)\s\w+", ""),
    (r"\b(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)(\simage[s]?)?", ""),
    (r"\bpage\s+\d+\b", ""),
    (r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b", r" "),  # j2d1a2a...
    (r"\b\d+\.?\d*[xх×]\d+\.?\d*\b", ""),  # 1920x1080 (Latin x, Cyrillic х, ×)
    (r"\b\s+\:\s+", r": "),
    (r"(\D[,\./])\b", r"\1 "),  # space after punctuation glued to the next word
    (r"\s+", " "),
    # strip wrapping quotes and leading/trailing punctuation, drop lone ".something"
    (r"^[\"\']([\w\W]+)[\"\']$", r"\1"),
    (r"^[\'\_,\-\:;]", r""),
    (r"[\'\_,\-\:\-\+]$", r""),
    (r"^\.\S+$", ""),
]

_SEPARATORS = re.compile(r"(?:\-|\_)")


def caption_cleaning_available():
    """Whether ftfy and beautifulsoup4, which ``clean_caption`` needs, are installed."""
    return importlib.util.find_spec("ftfy") is not None and importlib.util.find_spec("bs4") is not None


def clean_caption(caption):
    """The caption cleaner of diffusers' PixArt/DeepFloyd-IF pipelines (one pass).

    Lower-cases; removes URLs, HTML, @names, CJK, IPs, ids, file names, product codes and shop
    boilerplate; normalises dashes, quotes and spacing. Needs ftfy and beautifulsoup4.
    """
    import ftfy
    from bs4 import BeautifulSoup

    caption = urllib.parse.unquote_plus(str(caption)).strip().lower()
    caption = re.sub("<person>", "person", caption)
    caption = re.sub(_URL.format("https?"), "", caption)
    caption = re.sub(_URL.format("www"), "", caption)
    caption = BeautifulSoup(caption, features="html.parser").text
    for pattern, replacement in _AFTER_HTML:
        caption = re.sub(pattern, replacement, caption)
    # this-is-my-cute-cat / this_is_my_cute_cat: separators only when there are many of them
    if len(_SEPARATORS.findall(caption)) > 3:
        caption = _SEPARATORS.sub(" ", caption)
    caption = html.unescape(html.unescape(ftfy.fix_text(caption)))
    for pattern, replacement in _AFTER_FTFY:
        caption = re.sub(pattern, replacement, caption)
    return caption.strip()


def _clean_twice(caption):
    # diffusers cleans twice: the second pass catches what the first one exposed.
    return clean_caption(clean_caption(caption))


_warned_no_cleaner = False


def preprocess_text(prompts, clean_caption=True):
    """diffusers' ``_text_preprocessing``: a str or list of str -> list of str.

    clean_caption=True runs ``clean_caption`` twice; without ftfy/beautifulsoup4 it falls back to lower() + strip() and warns once.
    """
    global _warned_no_cleaner
    if clean_caption and not caption_cleaning_available():
        if not _warned_no_cleaner:
            logger.warning("clean_caption=True needs the ftfy and beautifulsoup4 packages (pip install ftfy "
                           "beautifulsoup4); prompts are only lower-cased and stripped")
            _warned_no_cleaner = True
        clean_caption = False
    if isinstance(prompts, str):
        prompts = [prompts]
    if clean_caption:
        return [_clean_twice(p) for p in prompts]
    return [p.lower().strip() for p in prompts]


# ----------------------------------------------------------------------------- tokenizer


class PromptTokenizer:
    """The T5 sentencepiece tokenizer of a ``tokenizer/`` folder, padding to a fixed length."""

    def __init__(self, hf_tokenizer):
        self.tokenizer = hf_tokenizer

    @classmethod
    def from_pretrained(cls, folder):
        """Load with transformers: ``T5Tokenizer`` (sentencepiece, what diffusers' PixArt pipelines
        use) when the folder has ``spiece.model``, else ``AutoTokenizer`` (a ``tokenizer.json``)."""
        folder = os.fspath(folder)
        if not os.path.isdir(folder):
            raise CheckpointError(f"T5 tokenizer folder {folder} does not exist; {HF_REPO_HINT}")
        has_spiece = os.path.isfile(os.path.join(folder, "spiece.model"))
        if not has_spiece and not os.path.isfile(os.path.join(folder, "tokenizer.json")):
            raise CheckpointError(f"{os.path.join(folder, 'spiece.model')} is missing; {HF_REPO_HINT}")
        from transformers import AutoTokenizer, PreTrainedTokenizerBase, T5Tokenizer

        try:
            loaded = (T5Tokenizer if has_spiece else AutoTokenizer).from_pretrained(folder)
        except Exception as err:  # bad tokenizer_config.json, unreadable tokenizer.json...
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        else:
            if isinstance(loaded, PreTrainedTokenizerBase):
                return cls(loaded)
            reason = "not a valid sentencepiece model"  # transformers returns False for a corrupt spiece.model
        raise CheckpointError(f"cannot load the T5 tokenizer in {folder} ({reason}); {HF_REPO_HINT}")

    def tokenize(self, prompts, max_length=300, clean_caption=True):
        """prompts (str or list of N str) -> (input_ids, attention_mask), both (N, max_length) int32.

        Ids end with </s> and are padded with <pad> (mask 0) up to max_length; longer prompts are
        truncated (the </s> is kept) and a warning shows the dropped text.
        """
        texts = preprocess_text(prompts, clean_caption=clean_caption)
        encoded = self.tokenizer(texts, padding="max_length", max_length=max_length, truncation=True,
                                 add_special_tokens=True, return_attention_mask=True)
        full = self.tokenizer(texts, add_special_tokens=True)["input_ids"]
        for ids in full:
            if len(ids) > max_length:
                removed = self.tokenizer.decode(ids[max_length - 1:-1])
                logger.warning("this part of the prompt was truncated because T5 takes at most %d tokens: %s",
                               max_length, removed)
        return (np.asarray(encoded["input_ids"], dtype=np.int32),
                np.asarray(encoded["attention_mask"], dtype=np.int32))

    __call__ = tokenize


# Trimmed text lengths: the longest real prompt in a batch is rounded up to one of these (or to
# max_length), so the few shapes the compiled denoiser sees are reused.
TOKEN_BUCKETS = (16, 32, 64, 128, 192, 256)


def trimmed_length(mask, max_length):
    """The bucketed length that holds every real token of ``mask`` (N, L), at most ``max_length``."""
    longest = int(np.asarray(mask).sum(axis=1).max()) if len(mask) else 1
    return next((b for b in TOKEN_BUCKETS if b >= longest and b < max_length), max_length)


def encode_prompts(tokenizer, encoder, prompts, max_length=300, clean_caption=True, trim=False):
    """Tokenize and run T5: -> (embeddings (N, L, D) Tensor, mask (N, L) int32 Tensor).

    L = max_length, or with ``trim`` the bucketed longest real length (``trimmed_length``). Trimming
    is exact: T5's outputs at real positions do not depend on padded ones (they are masked out of
    attention, and relative position biases depend on distances only), and the DiT's
    cross-attention masks padded tokens too. ``tokenizer`` is a ``PromptTokenizer``, ``encoder`` a
    ``pixart.models.t5.T5Encoder``.
    """
    import mindspore as ms

    ids, mask = tokenizer.tokenize(prompts, max_length=max_length, clean_caption=clean_caption)
    if trim:
        length = trimmed_length(mask, max_length)
        ids, mask = ids[:, :length], mask[:, :length]
    ids, mask = ms.Tensor(ids), ms.Tensor(mask)
    return encoder(ids, mask), mask
