"""The multimodal demo: a tiny LLaVA with seeded random weights and a generated dataset of coloured shapes.

``lmflow run --plugins multimodal`` with neither a model nor a dataset fine-tunes :func:`demo_base_dir` on
:func:`demo_data_dir` with :data:`DEMO_SETTINGS`. Both directories are built once under ``$LMFLOW_CACHE/demo``,
named after a hash of what they are made of, so a change of settings or library versions builds new ones.

The model is the text demo's Llama (``lmflow_core/demo/model``) behind a two-layer CLIP vision tower: a
32-pixel image becomes 16 patches, i.e. 16 ``<image>`` tokens after the processor's expansion. The pictures
show one shape in one colour; the questions ask for the colour or the shape, and the answer's first word
(articles skipped) decides whether a generated answer is right (:func:`demo_answer_correct`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

try:
    from lmflow_core import lmflow_home
except ImportError:  # a core that does not export it yet

    def lmflow_home() -> Path:
        """lmflow's cache directory: ``$LMFLOW_CACHE``, default ``~/.cache/lmflow``."""
        return Path(os.environ.get("LMFLOW_CACHE") or Path.home() / ".cache" / "lmflow")


TEXT_MODEL_DIR = Path(__file__).resolve().parents[2] / "lmflow_core" / "demo" / "model"
IMAGE_TOKEN = "<image>"

#: What the tiny LLaVA is made of (part of its directory's fingerprint).
MODEL_SETTINGS: dict[str, Any] = {
    "vision": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 8,
    },
    "vision_feature_layer": -1,
    "vision_feature_select_strategy": "default",  # drop CLIP's class token: 16 image tokens, not 17
    "projector_hidden_act": "gelu",
}

#: What the dataset is made of (part of its directory's fingerprint).
DATA_SETTINGS: dict[str, Any] = {
    "train_images": 1200,
    "eval_images": 120,
    "image_size": 32,
    "supersample": 4,  # shapes are drawn 4x larger and scaled down: smooth edges
    "radius": (0.28, 0.45),  # of the image's side
    "offset": 0.12,  # the centre's largest distance from the middle, per axis, as a share of the side
    "shape_question_share": 0.5,
    "version": 2,  # raise when the drawing or the questions change
}

#: Colour name -> RGB. Strong, distinct hues on a light background.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 40, 180),
    "orange": (245, 130, 20),
}
SHAPES: tuple[str, ...] = ("square", "circle", "triangle", "cross")
SHAPE_QUESTION = "What shape is in the picture?"
COLOUR_QUESTIONS: tuple[str, ...] = ("What colour is the {shape}?", "What colour is the shape?")

#: Recommended ``lmflow run`` settings for the demo (RunConfig fields).
DEMO_SETTINGS: dict[str, Any] = {
    "epochs": 8,
    "learning_rate": 2e-3,
    "lr_scheduler": "cosine",
    "warmup": 0.05,
    "batch_size": 16,
    "block_size": 128,
    "logging_steps": 10,
    "save_steps": 150,
    "save_total_limit": 2,
    # Batches mixed as they come: grouped by length they hold one question each, and colours learn slowly.
    "group_by_length": False,
}

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] in ('image', 'image_url', 'input_image') %}{{ '<image>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] | trim }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


# ----------------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------------


def demo_base_dir(seed: int = 42) -> Path:
    """The tiny LLaVA with seeded initial weights, as a directory ``from_pretrained`` loads.

    Model, processor and tokenizer load with ``AutoModelForImageTextToText``, ``AutoProcessor`` and
    ``AutoTokenizer``. Built on first use (about 6 MB, a second); two builds give identical weights.
    """
    target = lmflow_home() / "demo" / f"multimodal-base-seed{seed}-{_model_fingerprint(seed)}"
    if not (target / "model.safetensors").is_file():
        _build_atomically(target, "model.safetensors", lambda staging: _write_model(staging, seed))
    return target


def _model_fingerprint(seed: int) -> str:
    import torch
    import transformers

    digest = hashlib.sha256(
        json.dumps(
            {
                "seed": seed,
                "settings": MODEL_SETTINGS,
                "template": CHAT_TEMPLATE,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
            },
            sort_keys=True,
        ).encode()
    )
    for name in ("config.json", *_TOKENIZER_FILES):
        digest.update((TEXT_MODEL_DIR / name).read_bytes())
    return digest.hexdigest()[:12]


def _write_model(directory: Path, seed: int) -> None:
    import torch
    from transformers import (
        AutoConfig,
        AutoModelForImageTextToText,
        AutoTokenizer,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaProcessor,
        set_seed,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = AutoTokenizer.from_pretrained(TEXT_MODEL_DIR)
    # Replaces the list of extra special tokens: keep the ones there.
    extra = [*tokenizer.extra_special_tokens, IMAGE_TOKEN]
    tokenizer.add_special_tokens({"extra_special_tokens": extra})
    tokenizer.chat_template = CHAT_TEMPLATE
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    text_config = AutoConfig.from_pretrained(TEXT_MODEL_DIR)
    text_config.vocab_size = len(tokenizer)
    text_config._name_or_path = ""
    vision = MODEL_SETTINGS["vision"]
    patches = (vision["image_size"] // vision["patch_size"]) ** 2
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**vision),
        text_config=text_config,
        image_token_index=image_token_id,
        image_seq_length=patches,
        vision_feature_layer=MODEL_SETTINGS["vision_feature_layer"],
        vision_feature_select_strategy=MODEL_SETTINGS["vision_feature_select_strategy"],
        projector_hidden_act=MODEL_SETTINGS["projector_hidden_act"],
        tie_word_embeddings=text_config.tie_word_embeddings,
    )
    set_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    side = vision["image_size"]
    processor = LlavaProcessor(
        # The PIL backend: no torchvision needed.
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": side}, crop_size={"height": side, "width": side}
        ),
        tokenizer=tokenizer,
        patch_size=vision["patch_size"],
        vision_feature_select_strategy=MODEL_SETTINGS["vision_feature_select_strategy"],
        num_additional_image_tokens=1,  # CLIP's class token, dropped again by the "default" strategy
        chat_template=CHAT_TEMPLATE,
    )
    model.save_pretrained(directory)
    processor.save_pretrained(directory)


# ----------------------------------------------------------------------------------------------------------------
# The dataset
# ----------------------------------------------------------------------------------------------------------------


def demo_data_dir(seed: int = 0) -> Path:
    """The generated shapes dataset: ``train.jsonl``, ``eval.jsonl`` and their ``images/``.

    Each record is one OpenAI-style conversation, an image and a question in the user message and a short
    answer (``"Red."``, ``"A circle."``); image paths are relative to the data file. The evaluation images are
    drawn apart from the training ones. Built on first use (1320 small PNGs, under 1 MB, a few seconds).
    """
    target = lmflow_home() / "demo" / f"multimodal-data-seed{seed}-{_data_fingerprint(seed)}"
    if not (target / "eval.jsonl").is_file():
        _build_atomically(target, "eval.jsonl", lambda staging: _write_data(staging, seed))
    return target


def _data_fingerprint(seed: int) -> str:
    import PIL

    settings = {
        "seed": seed,
        "settings": DATA_SETTINGS,
        "colours": COLOURS,
        "shapes": SHAPES,
        "questions": [SHAPE_QUESTION, *COLOUR_QUESTIONS],
        "pillow": PIL.__version__,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def _write_data(directory: Path, seed: int) -> None:
    rng = random.Random(seed)
    (directory / "images").mkdir()
    # Training and evaluation images are drawn from one stream and kept apart by their exact drawing.
    seen: set[tuple[Any, ...]] = set()
    for split in ("train", "eval"):
        records = []
        for n in range(DATA_SETTINGS[f"{split}_images"]):
            while True:
                picture = _random_picture(rng)
                if picture not in seen:
                    break
            seen.add(picture)
            relative = f"images/{split}-{n:04d}.png"
            _draw(picture).save(directory / relative, optimize=True)
            records.append(_record(picture, relative, rng))
        # eval.jsonl last: its presence marks a finished build
        with open(directory / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps(record) + "\n" for record in records)


def _random_picture(rng: random.Random) -> tuple[Any, ...]:
    """(shape, colour, centre x, centre y, radius) on the supersampled canvas."""
    canvas = DATA_SETTINGS["image_size"] * DATA_SETTINGS["supersample"]
    smallest, largest = DATA_SETTINGS["radius"]
    radius = rng.randint(round(canvas * smallest), round(canvas * largest))
    # Near the middle: a frozen random vision tower tells shapes apart by where their edges are.
    offset = round(canvas * DATA_SETTINGS["offset"])
    low, high = max(radius, canvas // 2 - offset), min(canvas - radius, canvas // 2 + offset)
    return (
        rng.choice(SHAPES),
        rng.choice(list(COLOURS)),
        rng.randint(low, high),
        rng.randint(low, high),
        radius,
    )


def _draw(picture: tuple[Any, ...]):
    from PIL import Image, ImageDraw

    shape, colour, x, y, r = picture
    scale = DATA_SETTINGS["supersample"]
    canvas = DATA_SETTINGS["image_size"] * scale
    image = Image.new("RGB", (canvas, canvas), (245, 245, 240))
    draw = ImageDraw.Draw(image)
    fill = COLOURS[colour]
    if shape == "square":
        side = r * 0.85
        draw.rectangle((x - side, y - side, x + side, y + side), fill=fill)
    elif shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif shape == "triangle":
        draw.polygon([(x, y - r), (x - r, y + r * 0.8), (x + r, y + r * 0.8)], fill=fill)
    elif shape == "cross":
        arm = r * 0.35
        draw.rectangle((x - r, y - arm, x + r, y + arm), fill=fill)
        draw.rectangle((x - arm, y - r, x + arm, y + r), fill=fill)
    small = image.resize((canvas // scale, canvas // scale), Image.Resampling.LANCZOS)
    return small.quantize(16)  # a 16-colour palette: half the file size, the same picture to the eye


def _record(picture: tuple[Any, ...], path: str, rng: random.Random) -> dict[str, Any]:
    shape, colour = picture[:2]
    if rng.random() < DATA_SETTINGS["shape_question_share"]:
        question, answer = SHAPE_QUESTION, f"A {shape}."
    else:
        question, answer = rng.choice(COLOUR_QUESTIONS).format(shape=shape), f"{colour.capitalize()}."
    return {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image", "path": path}, {"type": "text", "text": question}],
            },
            {"role": "assistant", "content": answer},
        ]
    }


# ----------------------------------------------------------------------------------------------------------------
# Building once, atomically
# ----------------------------------------------------------------------------------------------------------------


def _build_atomically(target: Path, marker: str, write: Callable[[Path], None]) -> None:
    """Write into a staging directory beside ``target``, then rename it into place; a build another process
    finished first wins."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{target.name}-", dir=target.parent))
    try:
        write(staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / marker).is_file():  # not another process's finished build
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
