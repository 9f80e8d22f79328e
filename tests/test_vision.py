"""Vision-language models: image prompts through the same engine, attention capture and GIFT on image tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from engine import RunSettings, load_model, record
from engine.attention import AttentionCapture
from engine.event_arrays import attention_array
from engine.events import AttentionMap, Steering
from engine.models import ModelError
from engine.models.vision import encode_with_image, image_token_id
from engine.params import ParamError
from engine.prompt_spans import marked_spans
from tests.helpers import eager_attention

QUESTION = "Question: what colour is the square?"


@pytest.fixture(scope="module")
def vlm():
    return load_model("tiny-random-llava")


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "square.png"
    Image.fromarray((np.random.RandomState(0).rand(40, 40, 3) * 255).astype("uint8")).save(path)
    return str(path)


def _settings(image, **kwargs):
    return RunSettings(max_new_tokens=10, chat=True, image=image, ignore_eos=True, **kwargs)


def test_greedy_with_image_equals_generate(vlm, image):
    trace = record(vlm, "greedy", QUESTION, settings=_settings(image))
    ids, inputs = encode_with_image(vlm, QUESTION, image, chat=True)
    assert trace.prompt_token_ids == ids
    assert ids.count(image_token_id(vlm)) == 16  # a 4 x 4 grid of patches
    with torch.inference_mode():
        expected = vlm.model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                      **inputs, max_new_tokens=10, do_sample=False)[0, len(ids):].tolist()
    assert trace.output_token_ids == expected
    assert trace.info.settings["image"] == "square.png"


def test_capture_on_image_tokens_matches_eager(vlm, image):
    trace = record(vlm, "greedy", QUESTION, settings=_settings(image, attention=AttentionCapture(layers="all")))
    ids, inputs = encode_with_image(vlm, QUESTION, image, chat=True)
    first = attention_array(next(e for e in trace.events if isinstance(e, AttentionMap)))
    expected = torch.stack([a.mean(0) for a in eager_attention(vlm, ids, **inputs)]).numpy()
    np.testing.assert_allclose(first, expected, atol=2e-3)


def test_gift_on_the_image(vlm, image):
    plain = record(vlm, "greedy", QUESTION, settings=_settings(image))
    assert record(vlm, "gift", QUESTION, {"alpha": 0.0}, _settings(image)).output_token_ids == plain.output_token_ids
    steered = record(vlm, "gift", QUESTION, {"alpha": 5.0}, _settings(image))
    spans = marked_spans(vlm, steered.prompt_token_ids, "", "Question:", image_token_id(vlm))
    images = [i for i, t in enumerate(steered.prompt_token_ids) if t == image_token_id(vlm)]
    assert list(spans.context) == images
    assert vlm.decode(steered.prompt_token_ids[spans.query.start:spans.query.stop]) == QUESTION
    saliency = attention_array(next(e for e in steered.events if isinstance(e, AttentionMap)))[0, 0]
    outside = np.ones(len(saliency), dtype=bool)
    outside[images] = False
    assert saliency[images].max() == pytest.approx(1.0, abs=1e-3) and np.all(saliency[outside] == 0)
    steps = [e for e in steered.events if isinstance(e, Steering)]
    assert steps and steps[0].ratios[0] > 1


def test_images_need_a_vlm_and_an_image_decoder(vlm, llama, image, tmp_path):
    with pytest.raises(ModelError, match="text-only"):
        record(llama, "greedy", QUESTION, settings=_settings(image))
    with pytest.raises(ParamError, match="reads text prompts only"):
        record(vlm, "beam", QUESTION, settings=_settings(image))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(ModelError, match="cannot read the image"):
        record(vlm, "greedy", QUESTION, settings=_settings(str(broken)))


def test_vlm_folder_loads_through_image_text_to_text(vlm, image, tmp_path):
    vlm.model.save_pretrained(tmp_path)
    vlm.processor.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert type(loaded.model).__name__ == "LlavaForConditionalGeneration" and loaded.processor is not None
    trace = record(loaded, "greedy", QUESTION, settings=_settings(image))
    assert trace.output_token_ids == record(vlm, "greedy", QUESTION, settings=_settings(image)).output_token_ids
