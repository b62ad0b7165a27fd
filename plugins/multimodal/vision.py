"""What the plugin knows of each vision-language family: its parts, its image tokens, its pixel inputs.

Two families, told apart by the model's ``model_type``:

* ``llava`` (LLaVA 1.5 and the LLaVA-style models built on ``LlavaForConditionalGeneration``: a CLIP or SigLIP
  tower, an MLP projector, a causal LM): an image is ``<image>`` repeated once per patch feature, followed by a
  newline as LLaVA's own template writes it; the pixel values have one fixed size.
* ``qwen2_vl`` (Qwen2-VL, Qwen2.5-VL): an image is ``<|vision_start|>``, ``<|image_pad|>`` once per merged patch
  (its count depends on the image's size), ``<|vision_end|>``; the model also takes ``image_grid_thw`` and
  ``mm_token_type_ids``.

Only the model's image processor is used (never its video processor, which needs torchvision), and the image
tokens are expanded here, exactly as the model's processor expands them.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmflow_core import LmflowError

LLAVA_TYPES = ("llava",)
QWEN_TYPES = ("qwen2_vl", "qwen2_5_vl")
SUPPORTED = LLAVA_TYPES + QWEN_TYPES
#: The largest image file read (a larger one is refused before it is decoded).
MAX_IMAGE_BYTES = 32 * 1024 * 1024
#: The most pixels an image may have (PIL's own guard against decompression bombs is a warning below 2x this).
MAX_IMAGE_PIXELS = 64_000_000
#: Parameter-name parts of each model part, checked in this order (the projector sits inside Qwen's tower).
PROJECTOR_NAMES = (".multi_modal_projector.", ".visual.merger.")
TOWER_NAMES = (".vision_tower.", ".visual.")


def family_of(model_config: Any) -> str | None:
    """``"llava"``, ``"qwen2_vl"`` or ``None`` (not a supported vision-language model)."""
    kind = getattr(model_config, "model_type", None)
    if kind in LLAVA_TYPES:
        return "llava"
    if kind in QWEN_TYPES:
        return "qwen2_vl"
    return None


def part_of(parameter_name: str) -> str:
    """``"projector"``, ``"vision_tower"`` or ``"language_model"`` for a parameter of a supported model."""
    name = "." + parameter_name
    if any(part in name for part in PROJECTOR_NAMES):
        return "projector"
    if any(part in name for part in TOWER_NAMES):
        return "vision_tower"
    return "language_model"


def open_image(source: Any, where: str = "", local_root: str | None = None) -> Any:
    """An RGB ``PIL.Image`` from a path, a ``data:`` URL or a ``PIL.Image``; one-line errors naming the image.

    A path is refused when it is not a regular file, larger than :data:`MAX_IMAGE_BYTES` or not an image;
    ``http(s)`` URLs are refused (nothing is fetched).
    """
    from PIL import Image, UnidentifiedImageError

    label = f"{where}: " if where else ""
    if isinstance(source, Image.Image):
        return _checked(source, label + "image").convert("RGB")
    if not isinstance(source, str) or not source:
        raise LmflowError(f"{label}an image must be a path or a data: URL, got {type(source).__name__}")
    if source.startswith("data:"):
        data = decode_data_url(source, label)
        name = "the data: URL"
        stream: Any = io.BytesIO(data)
    elif source.startswith(("http://", "https://")):
        raise LmflowError(
            f"{label}image {source[:80]} is a web address, and images are never fetched",
            "download it and pass the file, or send it as a data: URL",
        )
    else:
        path = Path(source.removeprefix("file://")).expanduser()
        name = str(path)
        if not path.exists():
            raise LmflowError(f"{label}image {path} does not exist", "check the path")
        if not path.is_file():
            raise LmflowError(f"{label}image {path} is not a regular file", "pass an image file")
        if path.stat().st_size > MAX_IMAGE_BYTES:
            raise LmflowError(
                f"{label}image {path} is {path.stat().st_size / 2**20:.0f} MiB, over the "
                f"{MAX_IMAGE_BYTES // 2**20} MiB limit",
                "resize it",
            )
        stream = path
    try:
        with Image.open(stream) as image:
            _checked(image, f"{label}image {name}")
            image.load()
            return image.convert("RGB")
    except LmflowError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise LmflowError(
            f"{label}image {name} cannot be read ({exc})", "pass a PNG, JPEG, WebP or GIF image"
        ) from None


def image_size(source: Any, where: str = "") -> tuple[int, int]:
    """``(width, height)`` of an image, reading only its header where it can; errors as :func:`open_image`."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, Image.Image):
        return source.size
    if isinstance(source, str) and not source.startswith(("data:", "http://", "https://")):
        path = Path(source.removeprefix("file://")).expanduser()
        if path.is_file() and path.stat().st_size <= MAX_IMAGE_BYTES:
            try:
                with Image.open(path) as image:
                    return _checked(image, f"{where}: image {path}" if where else f"image {path}").size
            except LmflowError:
                raise
            except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
                pass  # open_image reports it in full
    return open_image(source, where).size


def _checked(image: Any, name: str) -> Any:
    width, height = image.size
    if width < 1 or height < 1 or width * height > MAX_IMAGE_PIXELS:
        raise LmflowError(
            f"{name} is {width}x{height} pixels, outside 1 to {MAX_IMAGE_PIXELS:,} pixels", "resize it"
        )
    return image


def decode_data_url(url: str, label: str = "") -> bytes:
    """The bytes of a base64 ``data:`` URL; a one-line error for any other form or broken base64."""
    head, comma, payload = url.partition(",")
    if not comma or not head.endswith(";base64"):
        raise LmflowError(f"{label}an image data: URL must be base64 (data:image/png;base64,...)")
    if len(payload) * 3 // 4 > MAX_IMAGE_BYTES:
        raise LmflowError(
            f"{label}the image in a data: URL is over {MAX_IMAGE_BYTES // 2**20} MiB", "resize it"
        )
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise LmflowError(f"{label}an image data: URL holds broken base64") from None


@dataclass
class Vision:
    """A loaded model's image handling: its image processor and image tokens (see the module docstring)."""

    family: str
    image_processor: Any
    tokenizer: Any
    model_config: Any
    _counts: dict[tuple[int, int], int] = field(default_factory=dict)

    @property
    def image_token(self) -> str:
        return "<|image_pad|>" if self.family == "qwen2_vl" else self._llava_token()

    @property
    def image_token_id(self) -> int:
        config = self.model_config
        token_id = getattr(config, "image_token_id", None)
        if token_id is None:
            token_id = getattr(config, "image_token_index", None)
        return int(token_id)

    def _llava_token(self) -> str:
        return self.tokenizer.convert_ids_to_tokens(self.image_token_id)

    def tokens_for(self, size: tuple[int, int]) -> int:
        """How many image tokens an image of ``size`` (width, height) becomes."""
        if self.family == "llava":
            size = (0, 0)  # every image is resized to the tower's input
        if size not in self._counts:
            self._counts[size] = self._count(size)
        return self._counts[size]

    def _count(self, size: tuple[int, int]) -> int:
        if self.family == "qwen2_vl":
            from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

            processor = self.image_processor
            patch, merge = processor.patch_size, processor.merge_size
            height, width = smart_resize(
                size[1],
                size[0],
                factor=patch * merge,
                min_pixels=getattr(processor.size, "shortest_edge", None) or 56 * 56,
                max_pixels=getattr(processor.size, "longest_edge", None) or 28 * 28 * 1280,
            )
            return (height // patch) * (width // patch) // (merge * merge)
        vision = self.model_config.vision_config
        side = vision.image_size // vision.patch_size
        strategy = getattr(self.model_config, "vision_feature_select_strategy", "default")
        has_cls = getattr(vision, "model_type", "") == "clip_vision_model"
        return side * side + (1 if has_cls and strategy == "full" else 0)

    @property
    def template_image(self) -> str:
        """What a chat template writes for an image, before the processor expands it."""
        if self.family == "qwen2_vl":
            return "<|vision_start|><|image_pad|><|vision_end|>"
        return self.image_token

    def placeholder(self, size: tuple[int, int]) -> str:
        """The text an image of ``size`` stands for in a rendered prompt (expanded image tokens)."""
        count = self.tokens_for(size)
        if self.family == "qwen2_vl":
            return "<|vision_start|>" + self.image_token * count + "<|vision_end|>"
        return self.image_token * count

    def pixel_inputs(self, images: list[Any]) -> dict[str, Any]:
        """The model inputs of ``images`` (``PIL.Image`` objects): ``pixel_values`` (+ ``image_grid_thw``)."""
        if not images:
            return {}
        out = self.image_processor(images=images, return_tensors="pt")
        keys = ("pixel_values", "image_grid_thw") if self.family == "qwen2_vl" else ("pixel_values",)
        return {key: out[key] for key in keys}

    def token_type_ids(self, input_ids: Any) -> dict[str, Any]:
        """``mm_token_type_ids`` (1 on image tokens) for Qwen2-VL, which transformers 5 requires; else nothing."""
        if self.family != "qwen2_vl":
            return {}
        return {"mm_token_type_ids": (input_ids == self.image_token_id).long()}


def load_image_processor(source: str, trust_remote_code: bool = False) -> Any:
    """The model's image processor (transformers picks the PIL backend when torchvision is missing)."""
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, ImportError) as exc:
        raise LmflowError(
            f"model {source} has no image processor that loads here ({str(exc).splitlines()[0]})",
            "use a vision-language model directory with its preprocessor_config.json",
        ) from None


def relative_to(base: Path, source: str) -> str:
    """An image path of a record made absolute against its data file's directory (URLs kept as they are)."""
    if source.startswith(("data:", "http://", "https://")):
        return source
    path = Path(os.path.expanduser(source.removeprefix("file://")))
    return str(path if path.is_absolute() else (base / path).resolve())
