"""Vision-language models: prompts with an image, and a tiny random LLaVA for tests.

A VLM loads through transformers' image-text-to-text classes with its processor (``LoadedModel.processor``). The
processor expands the image into image tokens inside the prompt ids and returns the pixel inputs, which only the
prefill forward needs: afterwards the image lives in the KV cache like any other prompt token. So a decoder that
accepts images passes ``ctx.prompt_inputs`` to its first forward and is otherwise unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForImageTextToText, CLIPVisionConfig, GenerationConfig, LlamaConfig, LlavaConfig

from engine.models.handle import LoadedModel, ModelError

TINY_VLM = "tiny-random-llava"
IMAGE_TOKEN = "<image>"
# The chat template of the tiny VLM: the tiny text models' turns, with an image part written as its image token.
TINY_VLM_CHAT_TEMPLATE = (
    "{% for message in messages %}<s>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for part in message['content'] %}{% if part['type'] == 'image' %}"
    "<image>\n{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)
TINY_IMAGE_SIZE, TINY_PATCH = 28, 7  # a 4 x 4 grid of patches: 16 image tokens per image


def build_tiny_vlm(seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """A random-weight LLaVA (2-layer CLIP vision tower, 2-layer Llama) with a real processor, built offline."""
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from engine.models.tiny import INIT_STD, SHAPE, build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    size = {"shortest_edge": TINY_IMAGE_SIZE}
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size=size, crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}),
        tokenizer=tokenizer, chat_template=TINY_VLM_CHAT_TEMPLATE, patch_size=TINY_PATCH,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       image_size=TINY_IMAGE_SIZE, patch_size=TINY_PATCH, projection_dim=32),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=SHAPE["hidden"], intermediate_size=SHAPE["ffn"],
                                num_hidden_layers=SHAPE["layers"], num_attention_heads=SHAPE["heads"],
                                num_key_value_heads=SHAPE["kv_heads"], initializer_range=INIT_STD, **ids),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), vision_feature_select_strategy="default",
        vision_feature_layer=-1, initializer_range=INIT_STD,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config)
    model.generation_config = GenerationConfig(**ids)
    return model.to(dtype).eval(), processor


def is_vision_config(config: Any) -> bool:
    return getattr(config, "vision_config", None) is not None


def image_token_id(model: LoadedModel) -> int | None:
    config = model.model.config
    value = getattr(config, "image_token_id", None)
    value = getattr(config, "image_token_index", None) if value is None else value
    return int(value) if value is not None else None


def encode_with_image(model: LoadedModel, prompt: str, image: str | Path, chat: bool) -> tuple[list[int], dict[str, torch.Tensor]]:
    """Prompt ids with the image's tokens in place, and the pixel inputs of the prefill forward."""
    from PIL import Image, UnidentifiedImageError

    if model.processor is None:
        raise ModelError(f"{model.name} is a text-only model; load a vision-language model to prompt with an image")
    try:
        with Image.open(image) as opened:
            picture = opened.convert("RGB")
    except (OSError, UnidentifiedImageError) as error:
        raise ModelError(f"cannot read the image {str(image)!r} ({error}); give a PNG or JPEG file") from None
    if chat:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        text = model.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    else:
        text = f"{getattr(model.processor, 'image_token', IMAGE_TOKEN)}\n{prompt}"
    # a chat template writes the begin-of-text token itself
    inputs = model.processor(text=[text], images=[picture], return_tensors="pt", add_special_tokens=not chat)
    ids = [int(i) for i in inputs.pop("input_ids")[0]]
    inputs.pop("attention_mask", None)
    return ids, {name: value for name, value in inputs.items() if isinstance(value, torch.Tensor)}
