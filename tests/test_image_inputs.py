"""Images in generate, chat and serve: every path checked before the model loads, and what reaches the plugin.

A stand-in for the ``multimodal`` plugin (:class:`ImageReader`) renders each image marker as a word, records
the images ``prompt_inputs`` receives and the pixel values that reach ``model.generate``, so the plumbing is
tested on the tiny chat model without a vision model.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import functools
import http.client
import io
import json
import os

import pytest
from helpers import assert_one_line_error, invoke, serving, write_json

from lmflow_core import IMAGE_MARKER, hookimpl
from lmflow_core.inference import open_session


class ImageReader:
    """Reads images as a multimodal plugin would: markers become the word ``picture``, each image a
    ``pixel_values`` row; the conversations' images and the pixel values ``generate`` gets are recorded."""

    def __init__(self):
        self.seen: list[list] = []  # the images of each prompt_inputs call
        self.contents: list[list[str]] = []  # the messages' text of each call
        self.pixels: list[tuple | None] = []  # pixel_values' shape at each model.generate

    @hookimpl
    def format_conversation(self, template, conversation, add_generation_prompt, tokenizer):
        plain = [
            dataclasses.replace(m, content=m.content.replace(IMAGE_MARKER, "picture"), images=())
            for m in conversation.messages
        ]
        return template.render(
            dataclasses.replace(conversation, messages=plain), add_generation_prompt, tokenizer
        )

    @hookimpl
    def prompt_inputs(self, conversation):
        import torch

        if not conversation.images:
            return None
        self.seen.append(list(conversation.images))
        self.contents.append([m.content for m in conversation.messages])
        return {"pixel_values": torch.zeros(len(conversation.images), 3, 4, 4)}

    @hookimpl
    def prepare_inference(self, model):
        real = model.generate

        @functools.wraps(real)
        def generate(*args, pixel_values=None, **kwargs):
            self.pixels.append(None if pixel_values is None else tuple(pixel_values.shape))
            return real(*args, **kwargs)

        model.generate = generate


def png(path, colour="red", size=(8, 8)):
    from PIL import Image

    Image.new("RGB", size, colour).save(path)
    return path


def data_url(colour="red", size=(8, 8)) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture
def reader(monkeypatch):
    """An ImageReader that every session the CLI opens in this test uses."""
    from lmflow_core import inference

    plugin = ImageReader()
    monkeypatch.setattr(
        inference, "open_session", functools.partial(inference.open_session, extra_plugins={"reader": plugin})
    )
    return plugin


# ---- lmflow generate --image ----------------------------------------------------------------------------------


def test_bad_images_are_one_line_errors_before_the_model_loads(runner, chat_model, tmp_path, model_loads):
    from PIL import Image

    (tmp_path / "notes.png").write_text("not a picture")
    with open(tmp_path / "huge.png", "wb") as handle:
        handle.truncate(21 * 2**20)  # sparse: 21 MiB on paper
    Image.new("1", (8000, 8000)).save(tmp_path / "bomb.png")  # 64 megapixels in a few KB
    os.mkfifo(tmp_path / "pipe.png")
    cases = {
        "missing.png": ("does not exist", "Pass the path of an image file"),
        "pipe.png": ("named pipe", "not a regular file"),
        "notes.png": ("is not an image that PIL can read", "PNG, JPEG"),
        "huge.png": ("21.0 MiB, more than the 20.0 MiB", "image"),
        "bomb.png": ("8000 x 8000 pixels, more than the 50 megapixels", "Resize"),
    }
    for name, fragments in cases.items():
        result = invoke(runner, "generate", chat_model, "--image", tmp_path / name, "--prompt", "What is it?")
        assert_one_line_error(result, str(tmp_path / name), *fragments)
    assert model_loads == []


def test_an_image_without_a_plugin_that_reads_images_names_the_plugin(runner, chat_model, tmp_path):
    result = invoke(runner, "generate", chat_model, "--image", png(tmp_path / "a.png"), "--prompt", "Hi")
    assert_one_line_error(result, "without a plugin that reads images", "--plugins multimodal")


def test_generate_attaches_the_images_before_the_prompt(runner, chat_model, tmp_path, reader):
    a, b = png(tmp_path / "a.png"), png(tmp_path / "b.png", "blue")
    result = invoke(
        runner, "generate", chat_model, "--image", a, "--image", b, "--prompt", "Which colours?",
        "--max-new-tokens", "3",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert reader.seen == [[str(a), str(b)]]
    assert reader.contents == [["<image>\n<image>\nWhich colours?"]]
    assert reader.pixels == [(2, 3, 4, 4)]  # the plugin's inputs reached model.generate


def test_messages_files_carry_images_relative_to_the_file(runner, chat_model, tmp_path, reader):
    (tmp_path / "chats" / "pics").mkdir(parents=True)
    a = png(tmp_path / "chats" / "pics" / "a.png")
    b = png(tmp_path / "chats" / "b.png", "green")
    c = png(tmp_path / "c.png", "blue")
    messages = write_json(
        tmp_path / "chats" / "m.json",
        [
            {"role": "user", "content": [{"type": "image", "path": "pics/a.png"}, {"type": "text", "text": "And?"}]},
            {"role": "assistant", "content": "Red."},
            {"role": "user", "content": "<image>\nThis one?", "images": ["b.png"]},
        ],
    )  # fmt: skip
    result = invoke(
        runner, "generate", chat_model, "--messages", messages, "--image", c, "--max-new-tokens", "2"
    )
    assert result.exit_code == 0, result.stderr
    assert reader.seen == [[str(a), str(c), str(b)]]  # --image goes first in the last user message
    assert reader.contents[0][2] == "<image>\n<image>\nThis one?"
    bad = write_json(
        tmp_path / "chats" / "bad.json", [{"role": "user", "content": "<image>x", "images": ["no.png"]}]
    )
    assert_one_line_error(
        invoke(runner, "generate", chat_model, "--messages", bad), "no.png", "does not exist"
    )
    web = write_json(
        tmp_path / "web.json",
        [{"role": "user", "content": "<image>x", "images": ["https://example.com/a.png"]}],
    )
    assert_one_line_error(invoke(runner, "generate", chat_model, "--messages", web), "does not fetch images")


# ---- lmflow chat: /image ----------------------------------------------------------------------------------------


def test_chat_attaches_images_to_the_next_message_and_keeps_them(runner, chat_model, tmp_path, reader):
    from lmflow_core.cli import cli

    a = png(tmp_path / "a.png")
    script = f"/image {a}\n/image\n/image {tmp_path / 'missing.png'}\nWhat is it?\nAnd now?\n/image {a}\n/image clear\nBye\n"
    result = runner.invoke(cli, ["chat", str(chat_model), "--max-new-tokens", "3"], input=script)
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"(image {a} attached to your next message (1 pending))"
    assert lines[1] == f"(pending for your next message: {a})"
    assert lines[2].startswith("(error: image ") and "does not exist" in lines[2]
    assert lines[5].endswith("(1 pending))") and lines[6] == "(1 pending image(s) dropped)"
    # The image stays in the history with its message: the second and third turns still send it.
    assert reader.seen == [[str(a)], [str(a)], [str(a)]]
    assert reader.contents[0] == ["<image>\nWhat is it?"]
    assert reader.contents[2][2] == "And now?" and reader.contents[2][4] == "Bye"


def test_chat_without_a_plugin_that_reads_images_says_so_and_goes_on(runner, chat_model, tmp_path):
    from lmflow_core.cli import cli

    script = f"/image {png(tmp_path / 'a.png')}\nHi\n"
    result = runner.invoke(cli, ["chat", str(chat_model), "--max-new-tokens", "2"], input=script)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines()[0] == "(this model reads no images: use a vision-language model with --plugins multimodal)"  # fmt: skip
    assert len(result.stdout.splitlines()) == 2  # the reply to "Hi"


# ---- lmflow serve: image parts ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_session(chat_model):
    plugin = ImageReader()
    session = open_session(str(chat_model), extra_plugins={"reader": plugin})
    session.reader = plugin
    return session


@pytest.fixture
def served(image_session):
    image_session.reader.__init__()
    return image_session


@contextlib.contextmanager
def serving_at(session, **settings):
    """``lmflow serve``'s server for ``session`` in a thread; yields its address."""
    with serving(session, **settings) as server:
        yield server.base


def post(base: str, body: dict | bytes) -> tuple[int, dict]:
    connection = http.client.HTTPConnection(base, timeout=120)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    connection.request("POST", "/v1/chat/completions", data, {"Content-Type": "application/json"})
    response = connection.getresponse()
    status, answer = response.status, json.loads(response.read())
    connection.close()
    return status, answer


def with_image(url: str, text: str = "What is it?", kind: str = "image_url") -> dict:
    part = (
        {"type": "image_url", "image_url": {"url": url}}
        if kind == "image_url"
        else {"type": "image", "url": url}
    )
    content = [part, {"type": "text", "text": text}]
    return {"messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": 3}


def refused(answer: tuple[int, dict], status: int, *fragments: str) -> None:
    code, body = answer
    assert code == status, body
    message = body["error"]["message"]
    assert "\n" not in message and "Traceback" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_image_parts_reach_the_plugin_and_web_urls_and_broken_data_are_refused(served, monkeypatch):
    from lmflow_core import inputs

    with serving_at(served) as base:
        status, answer = post(base, with_image(data_url("red", (6, 4))))
        assert status == 200 and answer["choices"][0]["message"]["content"] is not None, answer
        status, _ = post(base, with_image(data_url("blue", (5, 5)), kind="image"))
        assert status == 200
        [[first], [second]] = served.reader.seen
        assert (first.size, first.getpixel((0, 0))) == ((6, 4), (255, 0, 0))
        assert second.size == (5, 5) and served.reader.contents[0] == ["<image>What is it?"]
        assert served.reader.pixels == [(1, 3, 4, 4), (1, 3, 4, 4)]
        refused(
            post(base, with_image("https://example.com/cat.png")),
            400,
            "messages.0.content.0",
            "does not fetch",
        )
        refused(post(base, with_image("data:image/png;base64,iVBOR%%%")), 400, "broken base64")
        text = "data:image/png;base64," + base64.b64encode(b"plain text").decode()
        refused(post(base, with_image(text)), 400, "not an image")
        refused(post(base, with_image("ftp://host/a.png")), 400, "scheme 'ftp'")
        monkeypatch.setattr(inputs, "IMAGE_FILE_LIMIT", 64 * 1024)
        big = "data:image/png;base64," + base64.b64encode(os.urandom(100 * 1024)).decode()
        refused(post(base, with_image(big)), 400, "more than the 64.0 KiB")
        refused(post(base, with_image("/etc/hostname")), 400, "--allow-local-images DIR")
        assert post(base, {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})[0] == 200
    with serving_at(served, max_request_bytes=1024 * 1024) as base:  # a body over the limit: 413, unread
        refused(post(base, with_image(data_url(size=(1, 1)), "x" * 2**21)), 413, "--max-request-bytes")


def test_local_images_only_under_the_allowed_directory(served, tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    inside = png(root / "a.png", "green")
    outside = png(tmp_path / "secret.png")
    (root / "link.png").symlink_to(outside)
    with serving_at(served, allow_local_images=str(root)) as base:
        assert post(base, with_image("a.png"))[0] == 200
        assert post(base, with_image(f"file://{inside}"))[0] == 200
        assert post(base, with_image(str(inside)))[0] == 200
        assert [image.getpixel((0, 0)) for [image] in served.reader.seen] == [(0, 128, 0)] * 3
        for escape in ("../secret.png", str(outside), "link.png", f"file://{root}/../secret.png"):
            refused(post(base, with_image(escape)), 400, "outside the directory")
        refused(post(base, with_image("nothing.png")), 400, "does not exist")


def test_a_server_whose_model_reads_no_images_refuses_them_with_400(chat_model):
    session = open_session(str(chat_model))
    with serving_at(session) as base:
        refused(
            post(base, with_image(data_url())),
            400,
            "without a plugin that reads images",
            "--plugins multimodal",
        )


def test_text_requests_stay_batched_while_image_requests_run_alone(served, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    from lmflow_core import batching

    joined = []
    real = batching.Batch.join
    monkeypatch.setattr(
        batching.Batch, "join", lambda self, job: (joined.append(job.inputs), real(self, job))[1]
    )
    text = {
        "messages": [{"role": "user", "content": "What is 2 plus 1?"}],
        "temperature": 0,
        "max_tokens": 12,
    }
    with serving_at(served, max_batch_size=8) as base:
        alone = post(base, text)[1]["choices"][0]["message"]["content"]
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda body: post(base, body), [text, with_image(data_url())] * 3))
    assert [status for status, _ in answers] == [200] * 6
    assert {a["choices"][0]["message"]["content"] for _, a in answers[::2]} == {alone}
    assert joined == [{}] * 4  # every text request joined the batch; no image request did
    assert served.reader.pixels == [(1, 3, 4, 4)] * 3


# ---- the chat page ----------------------------------------------------------------------------------------------


def test_the_chat_page_sends_an_image_with_the_next_message_and_keeps_it(served):
    from gradio_client import Client

    with serving_at(served, ui=True) as base:
        client = Client(f"http://{base}/", verbose=False)
        first = client.predict("What is it?", "", 0, 3, data_url("blue"), api_name="/respond")
        assert isinstance(first[0], str) and first[1] == ""  # the image box is emptied once sent
        client.predict("And now?", "", 0, 3, "", api_name="/respond")
    first_turn, second_turn = served.reader.seen
    assert [image.getpixel((0, 0)) for image in first_turn + second_turn] == [(0, 0, 255)] * 2
    assert served.reader.contents[1][0] == "<image>What is it?" and served.reader.contents[1][2] == "And now?"


# ---- the real plugin: the multimodal demo's tiny LLaVA ------------------------------------------------------------


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    """The multimodal demo's tiny LLaVA (seeded random weights), built once in the test session's cache."""
    demo = pytest.importorskip("lmflow_plugins.multimodal.demo")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LMFLOW_CACHE", str(tmp_path_factory.getbasetemp() / "lmflow-cache"))
        return demo.demo_base_dir()


@pytest.fixture(scope="module")
def llava_session(llava):
    return open_session(str(llava), plugins=["multimodal"])


def image_turn(image, text="What colour is it?") -> list[dict]:
    return [{"role": "user", "content": f"{IMAGE_MARKER}\n{text}", "images": [image]}]


def test_generate_and_chat_with_the_multimodal_plugin(runner, llava, llava_session, tmp_path):
    from lmflow_core.cli import cli
    from lmflow_core.generate import GenerationOptions

    red = png(tmp_path / "red.png", "red", (32, 32))
    expected = llava_session.chat(image_turn(str(red)), GenerationOptions(max_new_tokens=6)).text
    blue = png(tmp_path / "blue.png", "blue", (32, 32))
    assert expected != llava_session.chat(image_turn(str(blue)), GenerationOptions(max_new_tokens=6)).text
    result = invoke(
        runner, "generate", llava, "--plugins", "multimodal", "--image", red, "--prompt", "What colour is it?",
        "--max-new-tokens", "6", "--no-stream",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert result.stdout == expected + "\n"
    script = f"/image {red}\nWhat colour is it?\nAnd the shape?\n"
    chat = runner.invoke(
        cli, ["chat", str(llava), "--plugins", "multimodal", "--max-new-tokens", "6"], input=script
    )
    assert chat.exit_code == 0, chat.stderr
    assert chat.stdout.splitlines()[1] == expected


def test_serve_with_the_multimodal_plugin(llava_session):
    from PIL import Image

    from lmflow_core.generate import GenerationOptions

    url = data_url("blue", (32, 32))
    image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    expected = llava_session.chat(image_turn(image), GenerationOptions(max_new_tokens=6)).text
    body = with_image(url, "What colour is it?")
    body["messages"][0]["content"].insert(1, {"type": "text", "text": "\n"})
    with serving_at(llava_session) as base:
        status, answer = post(base, {**body, "max_tokens": 6})
    assert status == 200, answer
    assert answer["choices"][0]["message"]["content"] == expected
