"""Tiny vision-language models for the multimodal tests, saved as normal model directories.

Heavy libraries are imported inside the functions, so importing this module costs nothing.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEMO_TOKENIZER = REPO / "lmflow_core" / "demo" / "model"

#: Qwen2-VL's vision tokens, added to the demo tokenizer (which has ChatML's ``<|im_start|>``/``<|im_end|>``).
QWEN2_VL_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")

#: Qwen2-VL's own chat template, cut to what the tests use: ChatML with images as vision_start/pad/end.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] in ('image', 'image_url') %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

#: Image processing: 8-pixel patches merged 2x2, so a 32x32 image is a 4x4 grid = 4 ``<|image_pad|>`` tokens.
QWEN2_VL_PATCH = 8
QWEN2_VL_MERGE = 2


def tiny_qwen2_vl(path: Path, seed: int = 0, version: str = "2") -> Path:
    """A tiny ``Qwen2VLForConditionalGeneration`` with seeded random weights, saved with its tokenizer and
    processor at ``path``; returns ``path``.

    The processor uses ``Qwen2VLImageProcessorPil`` (no torchvision) and no video processor; an image becomes
    ``grid_thw.prod() // 4`` ``<|image_pad|>`` tokens (32x32 pixels: 4). The model's forward needs
    ``mm_token_type_ids`` beside ``pixel_values`` and ``image_grid_thw`` (the processor returns all three).
    """
    import torch
    from transformers import (
        AutoTokenizer,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = AutoTokenizer.from_pretrained(DEMO_TOKENIZER)
    tokenizer.add_special_tokens(
        {"extra_special_tokens": [*tokenizer.extra_special_tokens, *QWEN2_VL_TOKENS]}
    )
    tokenizer.chat_template = QWEN2_VL_CHAT_TEMPLATE
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN2_VL_TOKENS}

    head_dim = 16
    shared = {"depth": 2, "num_heads": 2, "patch_size": QWEN2_VL_PATCH, "spatial_merge_size": QWEN2_VL_MERGE}
    if version == "2.5":  # Qwen2.5-VL: window attention in the tower, its width named hidden_size
        config_class, model_class = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
        vision = {
            **shared,
            "hidden_size": 32,
            "out_hidden_size": 64,
            "intermediate_size": 64,
            "window_size": 32,
        }
        vision.update(fullatt_block_indexes=[1], temporal_patch_size=2)
    else:
        config_class, model_class = Qwen2VLConfig, Qwen2VLForConditionalGeneration
        # hidden_size: the merger's output, the text model's hidden size
        vision = {**shared, "embed_dim": 32, "hidden_size": 64, "mlp_ratio": 2, "temporal_patch_size": 2}
    config = config_class(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 512,
            # M-RoPE: temporal, height and width sections of the rotary half-dimension (sum = head_dim // 2)
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            "bos_token_id": None,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    assert config.text_config.hidden_size // config.text_config.num_attention_heads == head_dim
    torch.manual_seed(seed)
    model = model_class(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    side = QWEN2_VL_PATCH * QWEN2_VL_MERGE
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=QWEN2_VL_PATCH,
        merge_size=QWEN2_VL_MERGE,
        temporal_patch_size=2,
        min_pixels=side * side,
        max_pixels=(4 * side) ** 2,
    )
    # No Qwen2VLProcessor: without torchvision it cannot be built (its video processor's class is a dummy).
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    image_processor.save_pretrained(path)
    return path
