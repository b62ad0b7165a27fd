"""Conversation templates: rendering, trained spans, template files, and the `lmflow templates` commands."""

from __future__ import annotations

import json

import pytest
from conftest import invoke

from lmflow_core.templates import (
    Conversation,
    Message,
    TemplateError,
    TurnTemplate,
    get_template,
    labels_from_offsets,
    render_text,
    trained_spans,
)


def test_chatml_renders_the_generation_prompt():
    template = get_template("chatml")
    conversation = Conversation([Message("user", " Hi ")], system="Be kind.")
    text = render_text(template.render(conversation, add_generation_prompt=True))
    assert (
        text
        == "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_trained_spans_cover_assistant_text_and_end_marker():
    template = get_template("chatml")
    conversation = Conversation.from_messages(
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    )
    segments = template.render(conversation)
    text = render_text(segments)
    [(start, end)] = trained_spans(segments)
    assert text[start:end] == "b<|im_end|>"


def test_labels_from_offsets_marks_tokens_that_overlap_a_span():
    ids = [10, 11, 12, 13]
    offsets = [(0, 3), (3, 6), (6, 9), (9, 12)]
    assert labels_from_offsets(ids, offsets, [(4, 7)]) == [-100, 11, 12, -100]
    assert labels_from_offsets(ids, offsets, [(0, 3), (9, 12)]) == [10, -100, -100, 13]


def test_empty_template_ends_assistant_turns_with_the_tokenizer_eos():
    from transformers import AutoTokenizer

    from lmflow_core.demo import demo_model_dir

    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir())
    segments = get_template("empty").render(
        Conversation.from_messages([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]),
        False,
        tokenizer,
    )
    assert render_text(segments) == "QA<|im_end|>"


@pytest.mark.parametrize(
    "messages, message",
    [
        ([], "has no messages"),
        ([{"role": "assistant", "content": "x"}], "roles must alternate"),
        ([{"role": "user", "content": "x"}, {"role": "user", "content": "y"}], "roles must alternate"),
        ([{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}], "has role 'tool'"),
    ],
)
def test_bad_conversations_are_errors(messages, message):
    with pytest.raises(TemplateError, match=message):
        get_template("chatml").render(Conversation.from_messages(messages))


def test_template_from_a_yaml_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(
        'name: mine\nuser: "U: {content}\\n"\nassistant_header: "A: "\nassistant_end: "</s>"\n'
        'assistant_trailer: "\\n"\nsystem: null\n'
    )
    template = get_template(str(path))
    assert isinstance(template, TurnTemplate) and template.name == "mine"
    conversation = Conversation.from_messages(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    )
    assert render_text(template.render(conversation)) == "U: hi\nA: yo</s>\n"
    with pytest.raises(TemplateError, match="has no system prompt"):
        template.render(Conversation(conversation.messages, system="s"))
    path.write_text("name: mine\nusr: x\n")
    with pytest.raises(TemplateError, match="unknown fields usr"):
        get_template(str(path))


def test_unknown_template_suggests_a_close_name():
    with pytest.raises(TemplateError, match=r"unknown template 'chtml' \(did you mean 'chatml'\?\)"):
        get_template("chtml")


def test_templates_cli_list_show_render(runner, tmp_path):
    listed = invoke(runner, "templates", "list").output
    assert "chatml" in listed and "empty" in listed
    shown = invoke(runner, "templates", "show", "chatml").output
    assert "<|im_start|>assistant\n[[2 plus 2 is 4.<|im_end|>]]\n" in shown
    messages = tmp_path / "m.json"
    messages.write_text(json.dumps([{"role": "user", "content": "Hi"}]))
    rendered = invoke(
        runner, "templates", "render", "chatml", "--messages", messages, "--add-generation-prompt"
    )
    assert rendered.output == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    bad = invoke(runner, "templates", "render", "nope", "--messages", messages)
    assert bad.exit_code == 2 and "unknown template 'nope'" in bad.stderr
