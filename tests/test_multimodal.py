"""The multimodal plugin on the demo's tiny LLaVA: data, masks, training, saving, inference, LoRA, resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lmflow_core import Conversation, GenerationOptions, LmflowError, get_template, open_session, run
from lmflow_core.errors import ConfigError, DataError, PluginError

pytest.importorskip("PIL")

TRAIN_STEPS = 8


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo's tiny LLaVA and generated images, built in the test session's cache (as the demo builds them
    once per machine)."""
    from lmflow_plugins.multimodal.demo import demo_base_dir, demo_data_dir

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LMFLOW_CACHE", str(tmp_path_factory.getbasetemp() / "lmflow-cache"))
        return demo_base_dir(), demo_data_dir()


def records_of(data_dir: Path, name: str, count: int) -> list[dict]:
    """The first ``count`` records of a demo file, image paths made absolute."""
    out = []
    for line in (data_dir / name).read_text().splitlines()[:count]:
        record = json.loads(line)
        for message in record["messages"]:
            if isinstance(message["content"], list):
                for part in message["content"]:
                    if part.get("type") == "image":
                        part["path"] = str(data_dir / part["path"])
        out.append(record)
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def image_of(record: dict) -> str:
    return next(p["path"] for p in record["messages"][0]["content"] if p.get("type") == "image")


@pytest.fixture(scope="module")
def small_data(demo, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mm-data")
    _, data_dir = demo
    train = write_jsonl(tmp / "train.jsonl", records_of(data_dir, "train.jsonl", 64))
    evaluation = write_jsonl(tmp / "eval.jsonl", records_of(data_dir, "eval.jsonl", 12))
    return train, evaluation


def settings(demo, small_data, out: Path, **more) -> dict:
    train, evaluation = small_data
    return {
        "model": str(demo[0]),
        "dataset": str(train),
        "eval_dataset": str(evaluation),
        "template": "chatml",
        "plugins": ["multimodal"],
        "output_dir": str(out),
        "max_steps": TRAIN_STEPS,
        "batch_size": 8,
        "learning_rate": 3e-3,
        "logging_steps": 1,
        "save_steps": None,
        "sample_prompts": [],
        **more,
    }


@pytest.fixture(scope="module")
def trained(demo, small_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("mm-run") / "out"
    result = run(**settings(demo, small_data, out, multimodal={"answer_accuracy": True}))
    return result, out


def part(key: str) -> str:
    """Which part of the model a saved weight belongs to."""
    from lmflow_plugins.multimodal.vision import part_of

    return part_of(key)


def state_of(directory) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(directory) / "model.safetensors"))


# ---- data --------------------------------------------------------------------------------------------------


def tokenized(demo, path: Path, block_size: int = 256, model: Path | None = None, **options):
    """The train split as a run tokenizes it (the plugin's hooks), without training."""
    from lmflow_core.data.pipeline import prepare_data
    from lmflow_core.report import Reporter
    from lmflow_core.train import check_run, configure

    config, plugins = configure(
        model=str(model or demo[0]),
        dataset=str(path),
        template="chatml",
        plugins=["multimodal"],
        block_size=block_size,
        output_dir=str(path.parent / "never"),
        **options,
    )
    checked = check_run(config, plugins)
    tokenizer = plugins.hook.load_tokenizer(config=config)
    data, _, _ = prepare_data(
        config, plugins, tokenizer, get_template("chatml"), block_size, checked.train_raw, None, Reporter()
    )
    return data, tokenizer, config


def test_tokens_and_pixels_equal_the_models_own_processor(demo, small_data):
    """Training encodes an image conversation exactly as the model's processor does (ids, pixels)."""
    from PIL import Image
    from transformers import AutoProcessor

    data, tokenizer, config = tokenized(demo, small_data[0])
    record = json.loads(small_data[0].read_text().splitlines()[0])
    question = record["messages"][0]["content"][1]["text"]
    processor = AutoProcessor.from_pretrained(demo[0])
    text = (
        f"<|im_start|>user\n<image>{question}<|im_end|>\n<|im_start|>assistant\n"
        f"{record['messages'][1]['content']}<|im_end|>\n"
    )
    expected = processor(text=text, images=Image.open(image_of(record)).convert("RGB"), return_tensors="pt")
    example = data[0]
    assert example["input_ids"] == expected["input_ids"][0].tolist()
    # image tokens, the prompt and the template's headers untrained; the answer and its end of turn trained
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert all(label == -100 for t, label in zip(example["input_ids"], example["labels"]) if t == image_id)
    trained = tokenizer.decode([t for t in example["labels"] if t != -100])
    assert trained == record["messages"][1]["content"] + "<|im_end|>"

    # the run's collator makes the processor's pixel values
    from lmflow_plugins.multimodal import data_collator

    batch = data_collator(config, tokenizer)([data[0], data[1]])
    assert torch.equal(batch["pixel_values"][:1], expected["pixel_values"])
    assert batch["pixel_values"].shape[0] == 2


def test_llava_style_records_read_as_their_openai_twins(demo, tmp_path, small_data):
    record = json.loads(small_data[0].read_text().splitlines()[0])
    question, answer = record["messages"][0]["content"][1]["text"], record["messages"][1]["content"]
    shutil.copy(image_of(record), tmp_path / "pic.png")
    llava = {
        "image": "pic.png",  # relative to the data file
        "conversations": [{"from": "human", "value": f"<image>{question}"}, {"from": "gpt", "value": answer}],
    }
    openai = {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image", "path": "pic.png"}, {"type": "text", "text": question}],
            },
            {"role": "assistant", "content": answer},
        ]
    }
    first, _, _ = tokenized(demo, write_jsonl(tmp_path / "llava.jsonl", [llava]))
    second, _, _ = tokenized(demo, write_jsonl(tmp_path / "openai.jsonl", [openai]))
    assert first[0]["input_ids"] == second[0]["input_ids"] and first[0]["labels"] == second[0]["labels"]
    assert first[0]["images"] == [str((tmp_path / "pic.png").resolve())]


def _bad(tmp_path, message: dict | None = None, **record):
    base = {
        "messages": [
            message
            or {
                "role": "user",
                "content": [{"type": "image", "path": "pic.png"}, {"type": "text", "text": "?"}],
            },
            {"role": "assistant", "content": "Red."},
        ]
    }
    return write_jsonl(tmp_path / "bad.jsonl", [{**base, **record}])


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing", r"bad.jsonl: line 1: image .*pic.png does not exist"),
        ("not_image", r"image .*pic.png cannot be read"),
        ("web", r"is a web address, and images are never fetched"),
        ("markers", r"the <image> markers outnumber the record's 1 image"),
        ("unplaced", r"1 of the record's images have no <image> marker"),
        ("assistant", r"message 1 is a assistant message with an image"),
    ],
)
def test_malformed_image_records_name_the_record_and_the_fix(demo, tmp_path, small_data, case, expected):
    record = json.loads(small_data[0].read_text().splitlines()[0])
    if case != "missing":
        shutil.copy(image_of(record), tmp_path / "pic.png")
    if case == "not_image":
        (tmp_path / "pic.png").write_text("not a picture")
    if case == "web":
        path = _bad(
            tmp_path,
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x.org/a.png"}}]},
        )
    elif case == "markers":
        path = _bad(tmp_path, {"role": "user", "content": "<image><image>?"}, images=["pic.png"])
    elif case == "unplaced":
        path = _bad(tmp_path, {"role": "user", "content": "no marker"}, images=["pic.png"])
    elif case == "assistant":
        path = write_jsonl(
            tmp_path / "bad.jsonl",
            [
                {
                    "images": ["pic.png"],
                    "messages": [
                        {"role": "user", "content": "?"},
                        {"role": "assistant", "content": "<image>"},
                    ],
                }
            ],
        )
    else:
        path = _bad(tmp_path)
    with pytest.raises(DataError, match=expected):
        tokenized(demo, path)


def test_an_example_whose_image_tokens_would_be_cut_is_an_error_naming_the_size_needed(demo, small_data):
    with pytest.raises(
        DataError,
        match=r"train.jsonl: line 1: its 16 image tokens do not fit in --block-size 12 "
        r"\(the example needs \d+ tokens\)\. Raise --block-size to \d+",
    ):
        tokenized(demo, small_data[0], block_size=12)


def test_text_models_and_packing_are_refused_before_loading(demo, small_data, tiny_llama, tmp_path):
    with pytest.raises(ConfigError, match="not a vision-language model this plugin reads"):
        run(**settings(demo, small_data, tmp_path / "a", model=str(tiny_llama)))
    with pytest.raises(ConfigError, match="drop --packing with --plugins multimodal"):
        run(**settings(demo, small_data, tmp_path / "b", packing=True))
    with pytest.raises(PluginError, match="speculative"):
        run(**settings(demo, small_data, tmp_path / "c", plugins=["multimodal", "speculative"]))
    assert not (tmp_path / "a").exists()


# ---- training and the saved model -----------------------------------------------------------------------------


def test_training_lowers_the_loss_freezes_the_tower_and_saves_a_loadable_model(trained, demo, small_data):
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    result, out = trained
    losses = [loss for _, loss in result.losses]
    assert len(losses) == TRAIN_STEPS and losses[-1] < 0.7 * losses[0]
    before, after = state_of(demo[0]), state_of(out)
    tower = [k for k in before if part(k) == "vision_tower"]
    assert tower and all(torch.equal(before[k], after[k]) for k in tower)  # frozen: bit-identical
    for name in ("projector", "language_model"):
        assert any(not torch.equal(before[k], after[k]) for k in before if part(k) == name)
    assert {"nll_per_token", "answer_accuracy", "answer_accuracy_before"} <= set(result.eval_metrics)

    # loads as it is with the auto classes; logits equal the session's own forward
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    record = json.loads(small_data[1].read_text().splitlines()[0])
    # the stored chat template renders image parts as the processor expects them
    text = processor.apply_chat_template(record["messages"][:1], add_generation_prompt=True)
    question = record["messages"][0]["content"][1]["text"]
    assert text == f"<|im_start|>user\n<image>{question}<|im_end|>\n<|im_start|>assistant\n"
    inputs = processor(text=text, images=Image.open(image_of(record)).convert("RGB"), return_tensors="pt")
    session = open_session(str(out), plugins=["multimodal"])
    with torch.no_grad():
        ours = session.model(**inputs).logits
        theirs = model(**inputs).logits
    assert torch.allclose(ours, theirs, atol=1e-5)
    # a session answers from the image as model.generate with the processor's inputs does
    generated = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    expected = processor.tokenizer.decode(
        generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True
    )
    conversation = Conversation.from_messages(record["messages"][:1])
    answer = session.chat(conversation, GenerationOptions(max_new_tokens=6)).text
    assert answer == expected.strip()


def test_a_text_session_refuses_images_in_one_line(chat_model, small_data):
    record = json.loads(small_data[1].read_text().splitlines()[0])
    session = open_session(str(chat_model), template="chatml")
    with pytest.raises(LmflowError, match="--plugins multimodal"):
        session.chat(record["messages"][:1])


def test_projector_only_keeps_the_language_model_and_tower_and_trained_tower_moves(
    demo, small_data, tmp_path
):
    run(**settings(demo, small_data, tmp_path / "p", max_steps=2, multimodal={"projector_only": True}))
    before, after = state_of(demo[0]), state_of(tmp_path / "p")
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(part(k) == "projector" for k in moved)
    run(**settings(demo, small_data, tmp_path / "t", max_steps=2, multimodal={"train_vision_tower": True}))
    after = state_of(tmp_path / "t")
    assert any(not torch.equal(before[k], after[k]) for k in before if part(k) == "vision_tower")


def test_lora_adapts_the_language_model_only_and_saves_the_projector(demo, small_data, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "lora"
    result = run(**settings(demo, small_data, out, plugins=["multimodal", "lora"], learning_rate=1e-2))
    saved = load_file(str(out / "adapter_model.safetensors"))
    adapted = {k for k in saved if "lora_" in k}
    assert adapted and all(".language_model." in k for k in adapted)
    assert any("multi_modal_projector" in k for k in saved)
    assert not any(".vision_tower." in k for k in saved)
    losses = [loss for _, loss in result.losses]
    assert losses[-1] < losses[0]
    record = json.loads(small_data[1].read_text().splitlines()[0])
    session = open_session(str(out), plugins=["multimodal"])
    options = GenerationOptions(max_new_tokens=4)
    answer = session.chat(record["messages"][:1], options).text

    # merged: a plain model directory that the auto classes load, answering as the adapter on its base does
    from lmflow_plugins.lora import merge_lora
    from transformers import AutoModelForImageTextToText, AutoProcessor

    merged = merge_lora(None, out, tmp_path / "merged", plugins=["multimodal"])
    assert (
        type(AutoModelForImageTextToText.from_pretrained(merged)).__name__ == "LlavaForConditionalGeneration"
    )
    assert AutoProcessor.from_pretrained(merged).image_processor is not None
    assert (
        open_session(str(merged), plugins=["multimodal"]).chat(record["messages"][:1], options).text == answer
    )


def test_resume_continues_bit_identically(demo, small_data, tmp_path, capfd):
    """A run stopped after checkpoint-2 and resumed ends as the straight run: the checkpoint's weights are
    reloaded under the names transformers saves LLaVA with (its Trainer alone would miss every one)."""
    from helpers import stopped_run

    whole = run(**settings(demo, small_data, tmp_path / "whole", max_steps=4, save_steps=2))
    assert (tmp_path / "whole" / "checkpoint-2" / "preprocessor_config.json").is_file()
    stopped = stopped_run(tmp_path / "whole", "checkpoint-2", tmp_path / "resumed")
    capfd.readouterr()
    resumed = run(**settings(demo, small_data, stopped, max_steps=4, save_steps=2, resume=True))
    assert "missing keys" not in capfd.readouterr().err
    assert resumed.losses == whole.losses
    one, two = state_of(tmp_path / "whole"), state_of(tmp_path / "resumed")
    assert all(torch.equal(one[k], two[k]) for k in one)


@pytest.mark.parametrize("version", ["2", "2.5"])
def test_qwen2_vl_images_become_as_many_tokens_as_their_size_gives_and_train(demo, tmp_path, version):
    """Qwen2-VL and Qwen2.5-VL: each image is <|vision_start|>, one <|image_pad|> per merged patch of its own
    size, <|vision_end|>, in place; pixels and grids as its image processor makes them; it trains and answers."""
    from lmflow_plugins.multimodal import data_collator
    from PIL import Image
    from transformers import AutoImageProcessor
    from vlm_models import tiny_qwen2_vl

    model = tiny_qwen2_vl(tmp_path / "qwen", version=version)
    Image.new("RGB", (32, 32), "red").save(tmp_path / "a.png")
    Image.new("RGB", (64, 40), "blue").save(tmp_path / "b.png")
    records = [
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image", "path": "a.png"}, {"type": "text", "text": "Colour?"}],
                },
                {"role": "assistant", "content": "Red."},
            ]
        },
        {
            "images": ["b.png"],
            "messages": [
                {"role": "user", "content": "And <image>?"},
                {"role": "assistant", "content": "Blue."},
            ],
        },
    ]
    path = write_jsonl(tmp_path / "q.jsonl", records * 4)
    data, tokenizer, config = tokenized(demo, path, model=model)
    processor = AutoImageProcessor.from_pretrained(model)
    images = [Image.open(tmp_path / name).convert("RGB") for name in ("a.png", "b.png")]
    expected = processor(images=images, return_tensors="pt")
    counts = [int(grid.prod()) // 4 for grid in expected["image_grid_thw"]]
    assert counts[0] != counts[1]  # the count follows the image's size
    pads = ["<|vision_start|>" + "<|image_pad|>" * n + "<|vision_end|>" for n in counts]
    texts = [
        f"<|im_start|>user\n{pads[0]}Colour?<|im_end|>\n<|im_start|>assistant\nRed.<|im_end|>\n",
        f"<|im_start|>user\nAnd {pads[1]}?<|im_end|>\n<|im_start|>assistant\nBlue.<|im_end|>\n",
    ]
    for example, text in zip(data, texts):
        assert example["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
    batch = data_collator(config, tokenizer)([data[0], data[1]])
    assert torch.equal(batch["pixel_values"], expected["pixel_values"])
    assert torch.equal(batch["image_grid_thw"], expected["image_grid_thw"])
    pad_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert torch.equal(batch["mm_token_type_ids"], (batch["input_ids"] == pad_id).long())

    result = run(
        model=str(model),
        dataset=str(path),
        template="chatml",
        plugins=["multimodal"],
        output_dir=str(tmp_path / "out"),
        max_steps=3,
        batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        sample_prompts=[],
    )
    losses = [loss for _, loss in result.losses]
    assert losses[-1] < losses[0]
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert saved.apply_chat_template([records[0]["messages"][0]], tokenize=False) == (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Colour?<|im_end|>\n"
    )
    session = open_session(str(tmp_path / "out"), plugins=["multimodal"], template="chatml")
    question = [
        {
            "role": "user",
            "content": [{"type": "image", "path": str(tmp_path / "b.png")}, {"type": "text", "text": "?"}],
        }
    ]
    assert isinstance(session.chat(question, GenerationOptions(max_new_tokens=3)).text, str)


def test_the_embedded_demo_is_the_plugins_own_and_flags_still_win(demo):
    from lmflow_core.train import configure

    config, _ = configure(plugins=["multimodal"])
    assert (config.model, config.template) == (str(demo[0]), "chatml")
    assert config.dataset == str(demo[1] / "train.jsonl") and config.eval_dataset == str(
        demo[1] / "eval.jsonl"
    )
    assert config.options_for("multimodal").answer_accuracy and not config.group_by_length
    config, _ = configure(plugins=["multimodal"], epochs=1, multimodal={"answer_accuracy": False})
    assert config.epochs == 1 and not config.options_for("multimodal").answer_accuracy
