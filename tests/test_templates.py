"""Conversation templates: parity with the models' published templates, loss masks, tools, the `tokenizer`
template, the generated Jinja, template files, and the `lmflow templates` commands."""

from __future__ import annotations

import functools
import json
import random

import pytest
from helpers import SHARED, invoke, write_json
from transformers import AutoTokenizer

from lmflow_core.catalog import available_templates, get_template
from lmflow_core.templates import (
    Conversation,
    Message,
    TemplateError,
    ToolCall,
    TurnTemplate,
    _fill,
    labels_from_offsets,
    render_text,
    tojson,
    trained_spans,
)

OFFICIAL = SHARED / "official_chat_templates"
REFERENCE = SHARED / "chat_templates" / "chat_templates"
DEEPSEEK_BOS, DEEPSEEK_EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
# Our template -> (the model's own template, verbatim; the family's BOS and EOS; extra render variables)
OFFICIAL_FAMILIES = {
    "gemma": ("gemma.jinja", "<bos>", "<eos>", {}),
    "gemma2": ("gemma.jinja", "<bos>", "<eos>", {}),
    "gemma3": ("gemma3.jinja", "<bos>", "<eos>", {}),
    "gemma3n": ("gemma3n.jinja", "<bos>", "<eos>", {}),  # rendered by our gemma3: same text format
    "llama3": ("llama3.jinja", "<|begin_of_text|>", "<|eot_id|>", {}),
    "mistral_v1": ("mistral_v1.jinja", "<s>", "</s>", {}),
    "mistral_v2v3": ("mistral_v2v3.jinja", "<s>", "</s>", {}),
    "mistral": ("mistral_v2v3.jinja", "<s>", "</s>", {}),
    "mistral_v3_tekken": ("mistral_v3_tekken.jinja", "<s>", "</s>", {}),
    "mistral_v7_tekken": ("mistral_v7_tekken.jinja", "<s>", "</s>", {}),
    "phi3": ("phi_3.jinja", "<s>", "<|endoftext|>", {}),
    "phi35": ("phi_35.jinja", "<s>", "<|endoftext|>", {}),
    "phi4_reasoning": ("phi_4.jinja", "<|endoftext|>", "<|im_end|>", {}),
    "qwen2_5": ("qwen_25.jinja", "", "<|im_end|>", {}),
    "qwen3_thinking": ("qwen3.jinja", "", "<|im_end|>", {}),
    "qwen3_5": ("qwen3_5.jinja", "", "<|im_end|>", {}),
    "qwen3_no_think": ("qwen3.jinja", "", "<|im_end|>", {"enable_thinking": False}),
    "deepseek_v2": ("deepseek_v2.jinja", DEEPSEEK_BOS, DEEPSEEK_EOS, {}),
    "deepseek_v3": ("deepseek_v3.jinja", DEEPSEEK_BOS, DEEPSEEK_EOS, {}),
    "deepseek": ("deepseek_v3.jinja", DEEPSEEK_BOS, DEEPSEEK_EOS, {}),
}
OFFICIAL_TEMPLATE_OF = {"gemma3n": "gemma3"}
OFFICIAL_WITHOUT_BOS = {"phi35", "phi4_reasoning"}  # their tokenizers' BOS is never written (nor added)
# Families without a file of their own above: the collected (edited) templates.
FAMILIES = {
    "alpaca": ("alpaca.jinja", "<s>", "</s>"),
    "amberchat": ("amberchat.jinja", "<s>", "</s>"),
    "chatml": ("chatml.jinja", "", "<|im_end|>"),
    "chatqa": ("chatqa.jinja", "<|begin_of_text|>", "<|end_of_text|>"),
    "falcon": ("falcon-instruct.jinja", "", "<|endoftext|>"),
    "granite": ("granite-3.0-instruct.jinja", "", "<|end_of_text|>"),
    "llama2": ("llama-2-chat.jinja", "<s>", "</s>"),
    "openchat": ("openchat-3.5.jinja", "<s>", "</s>"),
    "phi3_small": ("phi-3-small.jinja", "<|endoftext|>", "<|endoftext|>"),
    "saiga": ("saiga.jinja", "<s>", "</s>"),
    "solar": ("solar-instruct.jinja", "<s>", "</s>"),
    "vicuna": ("vicuna.jinja", "<s>", "</s>"),
    "zephyr": ("zephyr.jinja", "<s>", "</s>"),
}
CONVERSATIONS_PER_FAMILY = 400

needs_reference = pytest.mark.skipif(not REFERENCE.is_dir(), reason="../shared/reference is not present")
needs_official = pytest.mark.skipif(not OFFICIAL.is_dir(), reason="../shared/reference is not present")


def official_template(file: str):
    """Compile a model's own template verbatim, exactly as transformers' apply_chat_template does (its
    environment: raise_exception, strftime_now, tojson, the {% generation %} tag)."""
    from transformers.utils.chat_template_utils import _compile_jinja_template

    return _compile_jinja_template((OFFICIAL / file).read_text(encoding="utf-8"))


@functools.lru_cache
def reference_template(file: str):
    """Compile a collected template the way ../shared/reference/README.md says (what transformers does)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    text = (REFERENCE / file).read_text(encoding="utf-8")
    if file != "qwen2.5-instruct.jinja":
        text = text.replace("    ", "").replace("\n", "")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def tojson_filter(value, indent=None):  # transformers' tojson: no key sorting, no HTML escaping
        return json.dumps(value, ensure_ascii=False, indent=indent)

    env.filters["tojson"] = tojson_filter
    return env.from_string(text)


def raise_exception(message):
    raise TemplateError(message)


TEXTS = [
    "Hello!",
    "What is 2 + 2?",
    "  leading spaces",
    "trailing spaces   ",
    "\nnewline around\n",
    "",
    " ",
    "\t\n",
    "unicode: héllo wörld, 你好, Привет, 🙂",
    "braces {content} {{not jinja}} {bos_token}",
    "two\n\nparagraphs",
    "windows\r\nline\r\n\r\nends",
    "quotes ' \" and \\ backslashes",
    "<s> looks like a token </s>",
    "a long answer " * 20,
    "ends with newline\n",
    "   \u00a0nbsp\u00a0  ",
    "<think>\nweigh it\n</think>\n\n  the answer ",
]
SYSTEMS = [
    None,
    None,
    "You are a helpful assistant.",
    "  Be brief.  ",
    "",
    "System\nwith lines",
    "システム 🙂",
]


def random_conversation(rng: random.Random, broken: float = 0.0) -> tuple[Conversation, bool]:
    """A conversation of 1-4 exchanges; ends with a user turn (then often prompted) or an assistant turn.

    With probability ``broken`` the roles do not alternate (a repeated or missing turn)."""
    messages = []
    for _ in range(rng.randint(1, 4)):
        messages += [Message("user", rng.choice(TEXTS)), Message("assistant", rng.choice(TEXTS))]
    if rng.random() < 0.4:
        messages.append(Message("user", rng.choice(TEXTS)))
    if rng.random() < broken:
        i = rng.randrange(len(messages))
        messages.insert(i, Message(messages[i].role, rng.choice(TEXTS)))
    return Conversation(messages, rng.choice(SYSTEMS)), rng.random() < 0.5


def alternates(conversation: Conversation) -> bool:
    return all(m.role == ("user", "assistant")[i % 2] for i, m in enumerate(conversation.messages))


def render_or_error(render, *args, **kwargs):
    try:
        return render(*args, **kwargs)
    except Exception as exc:  # what the official template raised, to compare with ours
        return exc


@needs_official
@pytest.mark.parametrize("name", sorted(OFFICIAL_FAMILIES))
def test_rendering_equals_the_models_own_template_bos_included(name):
    """Byte for byte, on random conversations (system or not, 1-4 exchanges, with and without the generation
    prompt, whitespace at the edges); where the model's template refuses a conversation, ours does too."""
    file, bos, eos, extra = OFFICIAL_FAMILIES[name]
    official = official_template(file)
    template = get_template(OFFICIAL_TEMPLATE_OF.get(name, name))
    rng = random.Random(name)
    compared = refused = 0
    for _ in range(CONVERSATIONS_PER_FAMILY):
        conversation, prompt = random_conversation(rng, broken=0.1)
        expected = render_or_error(
            official.render,
            messages=conversation.to_dicts(),
            add_generation_prompt=prompt,
            bos_token=bos,
            eos_token=eos,
            **extra,
        )
        got = render_or_error(lambda c, p: render_text(template.render(c, p)), conversation, prompt)
        if isinstance(got, TemplateError):
            # Ours refuses what the model's template refuses, and beyond that only broken role order.
            assert isinstance(expected, Exception) or not alternates(conversation), (conversation, expected)
            assert "\n" not in str(got)
            refused += 1
            continue
        assert not isinstance(expected, Exception), (conversation, expected)
        assert got == expected, (conversation, prompt)
        if bos:  # the BOS first, once, where the format has one (besides any in the messages' own text)
            in_text = "".join(m["content"] for m in conversation.to_dicts()).count(bos)
            starts = name not in OFFICIAL_WITHOUT_BOS
            assert got.startswith(bos) == starts and got.count(bos) == starts + in_text
        compared += 1
    assert compared + refused == CONVERSATIONS_PER_FAMILY
    assert compared >= (80 if name in ("gemma", "gemma2") else 330)  # gemma refuses every system prompt


@needs_official
def test_qwen3_first_release_differs_from_the_later_revision_only_in_the_generation_prompt():
    """The file is the later revision (its prompt opens <think>); the first release's prompt ends at the
    assistant header (reference README)."""
    official = official_template("qwen3.jinja")
    first, later = get_template("qwen3"), get_template("qwen3_thinking")
    rng = random.Random("qwen3")
    for _ in range(200):
        conversation, _prompt = random_conversation(rng)
        history = official.render(messages=conversation.to_dicts(), add_generation_prompt=False)
        prompted = official.render(messages=conversation.to_dicts(), add_generation_prompt=True)
        assert prompted == history + "<|im_start|>assistant\n<think>\n\n"
        assert render_text(first.render(conversation)) == history
        assert render_text(first.render(conversation, True)) == history + "<|im_start|>assistant\n"
        assert render_text(later.render(conversation, True)) == prompted


@needs_official
def test_phi4_is_phi4_reasoning_without_its_default_system_prompt():
    official = official_template("phi_4.jinja")
    phi4 = get_template("phi4")
    default = "<|im_start|>system<|im_sep|>" + get_template("phi4_reasoning").default_system + "<|im_end|>"
    rng = random.Random("phi4")
    for _ in range(200):
        conversation, prompt = random_conversation(rng)
        expected = official.render(messages=conversation.to_dicts(), add_generation_prompt=prompt)
        if conversation.system is None:
            assert expected.startswith(default)
            expected = expected[len(default) :]
        assert render_text(phi4.render(conversation, prompt)) == expected


@needs_official
@pytest.mark.parametrize(
    "name, file, messages",
    [
        ("gemma", "gemma.jinja", [("system", "s"), ("user", "u"), ("assistant", "a")]),
        ("gemma", "gemma.jinja", [("user", "u"), ("user", "v")]),
        ("gemma3", "gemma3.jinja", [("assistant", "a"), ("user", "u")]),
        ("mistral_v1", "mistral_v1.jinja", [("user", "u"), ("assistant", "a"), ("assistant", "b")]),
        ("mistral_v2v3", "mistral_v2v3.jinja", [("system", "s"), ("assistant", "a")]),
        ("mistral_v3_tekken", "mistral_v3_tekken.jinja", [("user", "u"), ("user", "v")]),
        ("mistral_v1", "mistral_v1.jinja", [("user", "u"), ("system", "s")]),
    ],
)
def test_what_the_models_own_template_refuses_is_a_one_line_error(name, file, messages):
    dicts = [{"role": role, "content": text} for role, text in messages]
    with pytest.raises(Exception, match="not supported|must alternate|roles are supported"):
        official_template(file).render(messages=dicts, bos_token="<s>", eos_token="</s>")
    with pytest.raises(TemplateError) as error:
        get_template(name).render(Conversation.from_messages(dicts))
    assert "\n" not in str(error.value)
    assert (
        "no system prompt" in str(error.value)
        or "must alternate" in str(error.value)
        or ("has role 'system'" in str(error.value))
    )


@needs_reference
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_rendering_equals_the_collected_template_on_many_conversations(name):
    """Families without a template of their own in the reference: the collected one."""
    file, bos, eos = FAMILIES[name]
    reference = reference_template(file)
    template = get_template(name)
    rng = random.Random(name)
    checked = 0
    for _ in range(CONVERSATIONS_PER_FAMILY):
        conversation, prompt = random_conversation(rng)
        if name == "llama2" and conversation.system:
            # The collection trims the system prompt; Meta's code (which we follow) keeps it as is.
            conversation.system = conversation.system.strip()
        expected = reference.render(
            messages=conversation.to_dicts(),
            add_generation_prompt=prompt,
            bos_token=bos,
            eos_token=eos,
            raise_exception=raise_exception,
        )
        assert render_text(template.render(conversation, prompt)) == expected, (conversation, prompt)
        checked += 1
    assert checked == CONVERSATIONS_PER_FAMILY


@needs_official
@pytest.mark.parametrize(
    "name, file", [("qwen2_5", "qwen_25.jinja"), ("qwen3", "qwen3.jinja"), ("qwen3_5", "qwen3_5.jinja")]
)
def test_qwen_tool_calls_equal_the_models_own_template(name, file):
    reference = official_template(file)
    template = get_template(name)
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather in a city.",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        },
        {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}},
    ]
    rng = random.Random(7)
    for _ in range(150):
        messages = [Message("user", rng.choice(TEXTS))]
        calls = tuple(
            ToolCall(
                rng.choice(["get_weather", "add"]),
                {"city": rng.choice(["Paris", "東京"]), "n": rng.randint(0, 9)},
            )
            for _ in range(rng.randint(1, 3))
        )
        messages.append(Message("assistant", rng.choice(["", "Let me check."]), calls))
        messages += [Message("tool", json.dumps({"result": i})) for i in range(len(calls))]
        messages.append(Message("assistant", rng.choice(TEXTS)))
        conversation = Conversation(
            messages, rng.choice([None, "Be exact."]), tools if rng.random() < 0.8 else None
        )
        prompt = rng.random() < 0.5 and name != "qwen3"  # its first release's prompt: tested above
        expected = reference.render(
            messages=conversation.to_dicts(),
            tools=conversation.tools,
            add_generation_prompt=prompt,
            bos_token="",
            eos_token="<|im_end|>",
        )
        assert render_text(template.render(conversation, prompt)) == expected


@needs_reference
def test_granite_tool_calls_equal_the_published_template():
    reference = reference_template("granite-3.0-instruct.jinja")
    template = get_template("granite")
    tools = [{"name": "get_weather", "parameters": {"city": {"type": "string"}}}]
    rng = random.Random(11)
    for _ in range(100):
        call = ToolCall("get_weather", {"city": rng.choice(["Oslo", "Zürich"])})
        content = rng.choice(["", "I will look it up."])
        ours = [
            Message("user", rng.choice(TEXTS)),
            Message("assistant", content, (call,)),
            Message("tool", '{"temp": 3}'),
            Message("assistant", rng.choice(TEXTS)),
        ]
        theirs = [{"role": "user", "content": ours[0].content}]
        if content:
            theirs.append({"role": "assistant", "content": content})
        theirs += [
            {
                "role": "assistant_tool_call",
                "content": tojson([{"name": call.name, "arguments": call.arguments}]),
            },
            {"role": "tool_response", "content": '{"temp": 3}'},
            {"role": "assistant", "content": ours[3].content},
        ]
        system = rng.choice([None, "Knowledge cutoff: 2024."])
        if system is not None:
            theirs.insert(0, {"role": "system", "content": system})
        expected = reference.render(messages=theirs, tools=tools, add_generation_prompt=False)
        assert render_text(template.render(Conversation(ours, system, tools))) == expected


# ---- loss masks -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", sorted(n for n, t in available_templates().items() if isinstance(t, TurnTemplate))
)
def test_only_assistant_text_and_its_end_marker_are_trained(name):
    template = get_template(name)
    rng = random.Random(name)
    for _ in range(100):
        conversation, prompt = random_conversation(rng)
        if (
            conversation.system is not None
            and template.system is None
            and template.system_in_first_user is None
        ):
            continue
        segments = template.render(conversation, prompt)
        text = render_text(segments)
        trained = [text[a:b] for a, b in trained_spans(segments)]
        assistants = [m for m in conversation.messages if m.role == "assistant"]
        specials = template.special_tokens(None)
        expected = [_fill(template.assistant, template._clean(m.content), specials) for m in assistants]
        assert "".join(trained) == "".join(expected)
        # The end-of-turn marker (the text after the content in the trained pattern) is always trained.
        marker = _fill(template.assistant.split("{content}")[1], None, specials)
        if marker.strip():
            assert all(piece.endswith(marker) for piece in trained)
        # Nothing of a user message or the system prompt is trained.
        for piece in trained:
            assert template.user.split("{content}")[0] not in piece or not template.user.split("{content}")[0]


def test_qwen3_keeps_reasoning_only_after_the_last_user_query():
    template = get_template("qwen3")
    conversation = Conversation.from_messages(
        [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
            {"role": "user", "content": "3+3?"},
            {"role": "assistant", "content": "<think>\nadd again\n</think>\n\n6"},
        ]
    )
    segments = template.render(conversation)
    assert render_text(segments) == (
        "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
        "<|im_start|>user\n3+3?<|im_end|>\n<|im_start|>assistant\n<think>\nadd again\n</think>\n\n6<|im_end|>\n"
    )
    text = render_text(segments)
    assert [text[a:b] for a, b in trained_spans(segments)] == [
        "4<|im_end|>",
        "<think>\nadd again\n</think>\n\n6<|im_end|>",
    ]
    # A final answer without reasoning gets an empty think block: trained with qwen3, part of the prompt with
    # qwen3_no_think (whose generation prompt holds the same block).
    plain = Conversation.from_messages(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    )
    thinking = template.render(plain)
    assert render_text(thinking).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\nHello<|im_end|>\n")
    assert [s.text for s in thinking if s.trained] == ["<think>\n\n</think>\n\nHello<|im_end|>"]
    no_think = get_template("qwen3_no_think")
    assert render_text(no_think.render(plain)) == render_text(thinking)
    assert [s.text for s in no_think.render(plain) if s.trained] == ["Hello<|im_end|>"]
    prompt = Conversation.from_messages([{"role": "user", "content": "Hi"}])
    assert render_text(no_think.render(prompt, True)).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    assert render_text(template.render(prompt, True)).endswith("<|im_start|>assistant\n")


def test_tool_calls_are_trained_and_tool_results_are_not():
    template = get_template("qwen2_5")
    conversation = Conversation.from_messages(
        [
            {"role": "user", "content": "Weather in Oslo?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}
                ],
            },
            {"role": "tool", "content": '{"temp": -3}'},
            {"role": "assistant", "content": "It is -3 degrees."},
        ],
        tools=[{"name": "weather"}],
    )
    segments = template.render(conversation)
    trained = [s.text for s in segments if s.trained]
    assert trained == [
        '<tool_call>\n{"name": "weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>',
        "It is -3 degrees.<|im_end|>",
    ]
    assert not any("temp" in t for t in trained)


def test_token_labels_with_the_real_llama2_tokenizer(tmp_path):
    """On the LLaMA-2 SentencePiece tokenizer: trained tokens are the answer and </s>, nothing else."""
    import shutil

    from transformers import AutoTokenizer

    from lmflow_core.templates import encode_segments

    source = SHARED / "llama2_tokenizer" / "tokenizer.model"
    if not source.is_file():
        pytest.skip("../shared/reference/llama2_tokenizer is not present")
    shutil.copy(source, tmp_path / "tokenizer.model")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path, legacy=False)
    template = get_template("llama2")
    conversation = Conversation.from_messages(
        [
            {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello, friend!"},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Goodbye."},
        ],
        system="Be kind.",
    )
    segments = template.render(conversation)
    [ids], [labels] = encode_segments(tokenizer, [segments])
    assert ids.count(tokenizer.bos_token_id) == 2 and ids.count(tokenizer.eos_token_id) == 2
    trained = tokenizer.decode([token for token, label in zip(ids, labels) if label != -100])
    assert trained.replace(" ", "") == "Hello,friend!</s>Goodbye.</s>"
    assert all(label == -100 for token, label in zip(ids, labels) if token == tokenizer.bos_token_id)
    assert all(label != -100 for token, label in zip(ids, labels) if token == tokenizer.eos_token_id)


# ---- BOS: exactly where the model's own template puts it ----------------------------------------------------------

LLAMA2_MODEL = SHARED / "llama2_tokenizer" / "tokenizer.model"
needs_llama2 = pytest.mark.skipif(not LLAMA2_MODEL.is_file(), reason="../shared/reference is not present")
B_INST, E_INST, B_SYS, E_SYS = "[INST]", "[/INST]", "<<SYS>>\n", "\n<</SYS>>\n\n"


@pytest.fixture(scope="module")
def llama2_dir(tmp_path_factory):
    import shutil

    if not LLAMA2_MODEL.is_file():
        pytest.skip("../shared/reference/llama2_tokenizer is not present")
    directory = tmp_path_factory.mktemp("llama2_tokenizer")
    shutil.copy(LLAMA2_MODEL, directory / "tokenizer.model")
    return directory


def meta_llama2_ids(sp, conversation: Conversation) -> list[int]:
    """Meta's encoding of a Llama 2 chat (``chat_completion`` in llama/generation.py): the system prompt folded
    into the first user message, ``[bos] + encode("[INST] {user} [/INST] {answer} ") + [eos]`` per exchange, and
    ``[bos] + encode("[INST] {user} [/INST]")`` for a final user message."""
    dialog = conversation.to_dicts()
    if dialog[0]["role"] == "system":
        first = {
            "role": dialog[1]["role"],
            "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"],
        }
        dialog = [first, *dialog[2:]]
    ids: list[int] = []
    for prompt, answer in zip(dialog[::2], dialog[1::2]):
        text = f"{B_INST} {(prompt['content']).strip()} {E_INST} {(answer['content']).strip()} "
        ids += [sp.bos_id(), *sp.encode(text), sp.eos_id()]
    if len(dialog) % 2:
        ids += [sp.bos_id(), *sp.encode(f"{B_INST} {(dialog[-1]['content']).strip()} {E_INST}")]
    return ids


def conversation_records(conversations: list[Conversation]):
    from lmflow_core.data.formats import RawDataset

    records = [
        {"system": c.system, "messages": [{"role": m.role, "content": m.content} for m in c.messages]}
        for c in conversations
    ]
    return RawDataset("conversation", records, [])


# Text that is never a control token of the test tokenizers (sentencepiece reads "<s>" in text as text; a
# transformers tokenizer reads it as the BOS: a property of the message, not of the format).
PLAIN_TEXTS = [t for t in TEXTS if "<s>" not in t]


@needs_llama2
@pytest.mark.parametrize("legacy", [False, True])
def test_llama2_training_and_prompt_ids_equal_metas_encoding(llama2_dir, legacy):
    """The real LLaMA-2 tokenizer: lmflow's training ids (data preparation) and chat prompt ids equal Meta's
    reference encoding, with and without a system prompt, one to four exchanges, BOS once per exchange."""
    import sentencepiece

    from lmflow_core.data import tokenize_dataset
    from lmflow_core.templates import encode_prompt

    sp = sentencepiece.SentencePieceProcessor(model_file=str(LLAMA2_MODEL))
    tokenizer = AutoTokenizer.from_pretrained(llama2_dir, legacy=legacy, add_bos_token=True)
    template = get_template("llama2")
    rng = random.Random(f"meta{legacy}")
    finished, prompts = [], []
    while len(finished) < 60 or len(prompts) < 60:
        turns = [
            Message(("user", "assistant")[i % 2], rng.choice(PLAIN_TEXTS)) for i in range(rng.randint(1, 8))
        ]
        conversation = Conversation(turns, rng.choice(SYSTEMS))
        (prompts if turns[-1].role == "user" else finished).append(conversation)
    data, _stats = tokenize_dataset(
        conversation_records(finished), tokenizer, 100_000, template, use_cache=False
    )
    for conversation, example in zip(finished, data):
        expected = meta_llama2_ids(sp, conversation)
        assert example["input_ids"] == expected, conversation
        exchanges = len(conversation.messages) // 2
        assert expected.count(sp.bos_id()) == exchanges == expected.count(sp.eos_id())
        labels = example["labels"]
        assert all(label == -100 for token, label in zip(expected, labels) if token == sp.bos_id())
        assert all(label == token for token, label in zip(expected, labels) if token == sp.eos_id())
    for conversation in prompts:
        prompt = render_text(template.render(conversation, True, tokenizer))
        assert encode_prompt(tokenizer, prompt, template) == meta_llama2_ids(sp, conversation)
    # Why the turns are tokenized apart: in one piece, transformers' default (legacy=False) reads "[INST]"
    # after "<s>" as "[" where Meta's encoding has "▁[".
    joined = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if not legacy:
        assert joined[:2] == [sp.bos_id(), sp.piece_to_id("[")] != meta_llama2_ids(sp, conversation)[:2]
    assert meta_llama2_ids(sp, conversation)[:2] == [sp.bos_id(), sp.piece_to_id("▁[")]


# Per template: the BOS and EOS of the model family's tokenizer ("" for families whose tokenizer has no BOS:
# the test tokenizer then keeps "<s>", which it may add by itself but the format must not contain).
FAMILY_SPECIALS = {
    **{name: ("<bos>", "<eos>") for name in ("gemma", "gemma2", "gemma3", "tokenizer")},
    "llama3": ("<|begin_of_text|>", "<|eot_id|>"),
    "chatqa": ("<|begin_of_text|>", "<|end_of_text|>"),
    **{name: ("<s>", "<|endoftext|>") for name in ("phi3", "phi35")},
    "phi3_small": ("<|endoftext|>", "<|endoftext|>"),
    **{name: ("<|endoftext|>", "<|im_end|>") for name in ("phi4", "phi4_reasoning")},
    **{name: (DEEPSEEK_BOS, DEEPSEEK_EOS) for name in ("deepseek", "deepseek_v2", "deepseek_v2_legacy")},
    "deepseek_v3": (DEEPSEEK_BOS, DEEPSEEK_EOS),
    "granite": ("<|end_of_text|>", "<|end_of_text|>"),
    **{name: ("", "<|im_end|>") for name in ("chatml", "qwen2", "qwen2_5", "qwen3", "qwen3_5", "yi")},
    **{name: ("", "<|im_end|>") for name in ("qwen3_thinking", "qwen3_no_think")},
    "falcon": ("", "<|endoftext|>"),
    "chatglm3": ("", "</s>"),
}
# Templates whose text starts with the family's BOS (the others write none, as their models' templates).
STARTS_WITH_BOS = {
    "alpaca", "amberchat", "chatqa", "deepseek", "deepseek_v2", "deepseek_v2_legacy", "deepseek_v3",
    "gemma", "gemma2", "gemma3", "internlm2", "llama2", "llama3", "mistral", "mistral_v1", "mistral_v2v3",
    "mistral_v3_tekken", "mistral_v7_tekken", "openchat", "phi3", "phi3_small", "saiga", "solar",
    "tokenizer", "vicuna",
}  # fmt: skip


@pytest.fixture(scope="module")
def small_sentencepiece(tmp_path_factory):
    """A small SentencePiece BPE model like LLaMA's (byte fallback, <s> and </s>), trained in 0.03 s: the real
    one would make these 90 tests spend a minute in datasets' hashing of the tokenizer."""
    import sentencepiece

    directory = tmp_path_factory.mktemp("small_sentencepiece")
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXTS * 30),
        model_prefix=str(directory / "tokenizer"),
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        minloglevel=2,
    )
    return directory


@pytest.fixture(scope="module")
def bos_tokenizers(small_sentencepiece):
    """One tokenizer that adds the BOS by itself, one that does not."""
    return {
        adds: AutoTokenizer.from_pretrained(small_sentencepiece, add_bos_token=adds) for adds in (True, False)
    }


def with_family_specials(tokenizer, name: str, adds_bos: bool):
    bos, eos = FAMILY_SPECIALS.get(name, ("<s>", "</s>"))
    tokenizer.add_special_tokens({"bos_token": bos or "<s>", "eos_token": eos})
    tokenizer.add_bos_token = adds_bos  # rebuilds what the tokenizer adds, with this BOS
    tokenizer.chat_template = (OFFICIAL / "gemma.jinja").read_text() if name == "tokenizer" else None
    assert (tokenizer("x")["input_ids"][0] == tokenizer.bos_token_id) == adds_bos
    return bos


def reference_text(name: str, template, conversation: Conversation, tokenizer) -> str:
    """The model's own template's text where the reference has it; ours otherwise (tested above)."""
    file, *_ = OFFICIAL_FAMILIES.get(name, (None,))
    if name == "qwen3":
        file = "qwen3.jinja"  # the first release renders training conversations as the later file does
    if name == "tokenizer":
        file = "gemma.jinja"
    if file is not None:
        bos, eos, extra = *FAMILY_SPECIALS.get(name, ("<s>", "</s>")), OFFICIAL_FAMILIES.get(name, [{}])[-1]
        return official_template(file).render(
            messages=conversation.to_dicts(), bos_token=bos, eos_token=eos, **extra
        )
    if name in FAMILIES and name != "llama2":
        file, bos, eos = FAMILIES[name]
        return reference_template(file).render(
            messages=conversation.to_dicts(), bos_token=bos, eos_token=eos, raise_exception=raise_exception
        )
    return render_text(template.render(conversation, False, tokenizer))


@needs_official
@pytest.mark.parametrize("adds_bos", [True, False], ids=["tokenizer-adds-bos", "tokenizer-adds-none"])
@pytest.mark.parametrize("name", sorted(available_templates()))
def test_training_ids_hold_the_bos_exactly_where_the_models_template_puts_it(
    name, adds_bos, bos_tokenizers, small_sentencepiece
):
    """Data preparation's ids, for every template, with a tokenizer that adds the BOS by itself and one that does
    not: the tokens of the model's own template's text (BOS included, once, first), never a second BOS
    from the tokenizer, never none; a BOS is never trained."""
    from lmflow_core.data import tokenize_dataset

    tokenizer = bos_tokenizers[adds_bos]
    bos = with_family_specials(tokenizer, name, adds_bos)
    template = get_template(name)
    rng = random.Random(name)
    conversations = []
    while len(conversations) < 8:
        conversation, _prompt = random_conversation(rng)
        conversation.messages = [
            Message(m.role, m.content.replace("</s>", "").replace("<s>", "")) for m in conversation.messages
        ]
        if name in ("gemma", "gemma2", "tokenizer"):
            conversation.system = None  # refused by Gemma's template
        conversations.append(conversation)
    data, _stats = tokenize_dataset(
        conversation_records(conversations), tokenizer, 100_000, template, use_cache=False
    )
    sp = None
    if name == "llama2":
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_file=str(small_sentencepiece / "tokenizer.model"))
    bos_id = tokenizer.bos_token_id
    for conversation, example in zip(conversations, data, strict=True):
        ids, labels = example["input_ids"], example["labels"]
        text = reference_text(name, template, conversation, tokenizer)
        expected = (
            meta_llama2_ids(sp, conversation)
            if sp
            else tokenizer(text, add_special_tokens=False)["input_ids"]
        )
        assert ids == expected, conversation
        if not bos:
            assert bos_id not in ids  # the tokenizer's own BOS is not added to a format that has none
            continue
        assert text.startswith(bos) == (name in STARTS_WITH_BOS)
        assert ids.count(bos_id) == text.count(bos)
        if name in STARTS_WITH_BOS:
            assert ids[0] == bos_id and ids[1] != bos_id  # first, and not doubled
        if name not in ("llama2", "saiga"):  # a BOS per turn in those two formats
            assert ids.count(bos_id) == (name in STARTS_WITH_BOS) or bos_id == tokenizer.eos_token_id
        if bos_id != tokenizer.eos_token_id:
            assert all(label == -100 for token, label in zip(ids, labels) if token == bos_id)


def test_text_data_trains_no_bos(bos_tokenizers):
    """text_only data gets the BOS a tokenizer adds by itself, untrained; text2text keeps it in the prompt."""
    from lmflow_core.data import tokenize_dataset
    from lmflow_core.data.formats import RawDataset

    tokenizer = bos_tokenizers[True]
    with_family_specials(tokenizer, "llama2", True)
    raw = RawDataset("text_only", [{"text": "Rivers run."}, {"text": "Seas rise."}], [])
    data, _stats = tokenize_dataset(raw, tokenizer, 100_000, group_texts=False, use_cache=False)
    for example, text in zip(data, ("Rivers run.", "Seas rise.")):
        body = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert example["input_ids"] == [tokenizer.bos_token_id, *body, tokenizer.eos_token_id]
        assert example["labels"] == [-100, *body, tokenizer.eos_token_id]


# ---- the `tokenizer` template -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_tokenizer():
    from transformers import AutoTokenizer

    from lmflow_core.demo import demo_model_dir

    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir())
    tokenizer.chat_template = get_template("chatml").to_jinja()
    return tokenizer


def test_tokenizer_template_finds_the_same_masks_as_the_named_template(chat_tokenizer):
    ours, theirs = get_template("chatml"), get_template("tokenizer")
    rng = random.Random(3)
    for _ in range(100):
        conversation, prompt = random_conversation(rng)
        expected = ours.render(conversation, prompt, chat_tokenizer)
        got = theirs.render(conversation, prompt, chat_tokenizer)
        assert render_text(got) == render_text(expected)
        text = render_text(got)
        assert [text[a:b] for a, b in trained_spans(got)] == [text[a:b] for a, b in trained_spans(expected)]


def test_tokenizer_template_refuses_masks_it_cannot_determine(chat_tokenizer):
    conversation = Conversation.from_messages(
        [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"},
            {"role": "assistant", "content": "d"},
        ]
    )
    # A template that rewrites earlier turns as the conversation grows (here: a message count up front).
    chat_tokenizer.chat_template = (
        "{{ messages|length }}{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    )
    with pytest.raises(TemplateError, match="masks of the tokenizer's chat template cannot be determined"):
        get_template("tokenizer").render(conversation, False, chat_tokenizer)
    # A template that drops assistant text leaves nothing to train.
    chat_tokenizer.chat_template = (
        "{% for m in messages %}{% if m.role == 'user' %}{{ m.content }}{% endif %}{% endfor %}"
    )
    with pytest.raises(TemplateError, match="renders message 1 as empty"):
        get_template("tokenizer").render(conversation, False, chat_tokenizer)
    chat_tokenizer.chat_template = None
    with pytest.raises(TemplateError, match="needs a tokenizer with a chat template"):
        get_template("tokenizer").render(conversation, False, chat_tokenizer)
    chat_tokenizer.chat_template = get_template("chatml").to_jinja()


# ---- generated Jinja ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", sorted(n for n, t in available_templates().items() if isinstance(t, TurnTemplate))
)
def test_generated_jinja_renders_exactly_like_the_template(name, chat_tokenizer):
    template = get_template(name)
    tokenizer = chat_tokenizer
    tokenizer.bos_token = "<|endoftext|>"  # a tokenizer with both special tokens, for {bos_token}/{eos_token}
    jinja = template.to_jinja()
    rng = random.Random(name + "jinja")
    for _ in range(60):
        conversation, prompt = random_conversation(rng)
        try:
            expected = render_text(template.render(conversation, prompt, tokenizer))
        except TemplateError:
            continue
        got = tokenizer.apply_chat_template(
            conversation.to_dicts(), chat_template=jinja, tokenize=False, add_generation_prompt=prompt
        )
        assert got == expected, (conversation, prompt)


# ---- bad input ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "messages, message",
    [
        ([], "has no messages"),
        ([{"role": "assistant", "content": "x"}], "roles must alternate"),
        ([{"role": "user", "content": "x"}, {"role": "user", "content": "y"}], "roles must alternate"),
        (
            [{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}],
            "has no format for tool calls",
        ),
        ([{"role": "user", "content": "x"}, {"role": "robot", "content": "y"}], "has role 'robot'"),
    ],
)
def test_bad_conversations_are_errors(messages, message):
    with pytest.raises(TemplateError, match=message):
        get_template("chatml").render(Conversation.from_messages(messages))


def test_a_tool_result_must_follow_a_tool_call():
    conversation = Conversation.from_messages(
        [
            {"role": "user", "content": "x"},
            {"role": "assistant", "content": "y"},
            {"role": "tool", "content": "z"},
        ]
    )
    with pytest.raises(TemplateError, match="tool results may only follow an assistant's tool call"):
        get_template("qwen2_5").render(conversation)


def test_dataset_record_errors_name_the_record(tmp_path):
    from lmflow_core.data import load_raw_dataset
    from lmflow_core.errors import DataError

    records = [
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "user", "content": "b"},
                {"role": "assistant", "content": "c"},
            ]
        },
    ]
    with pytest.raises(
        DataError, match=r"c\.json: record 1: message 1 is from 'user' but roles must alternate"
    ):
        load_raw_dataset(write_json(tmp_path / "c.json", records), get_template("llama3"))
    tools = [
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "", "tool_calls": [{"name": "f", "arguments": {}}]},
                {"role": "tool", "content": "r"},
                {"role": "assistant", "content": "ok"},
            ]
        }
    ]
    with pytest.raises(DataError, match=r"record 0: template 'llama3' has no format for tool calls"):
        load_raw_dataset(write_json(tmp_path / "t.json", tools), get_template("llama3"))
    assert len(load_raw_dataset(tmp_path / "t.json", get_template("qwen3"))) == 1


def test_template_from_a_yaml_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(
        'name: mine\nuser: "U: {content}\\n"\nassistant_header: "A:"\nassistant: " {content}</s>"\n'
        'assistant_trailer: "\\n"\nsystem: null\nstop_strings: ["</s>"]\n'
    )
    template = get_template(str(path))
    assert (
        isinstance(template, TurnTemplate) and template.name == "mine" and template.stop_strings == ("</s>",)
    )
    conversation = Conversation.from_messages(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    )
    assert render_text(template.render(conversation)) == "U: hi\nA: yo</s>\n"
    with pytest.raises(TemplateError, match="has no system prompt"):
        template.render(Conversation(conversation.messages, system="s"))
    path.write_text("name: mine\nusr: x\n")
    with pytest.raises(TemplateError, match="unknown fields usr"):
        get_template(str(path))
    path.write_text("user: 5\n")
    with pytest.raises(TemplateError, match=r"field 'user' must be a string, got 5"):
        get_template(str(path))
    path.write_text("stop_strings: </s>\n")
    with pytest.raises(TemplateError, match=r"field 'stop_strings' must be a list of strings"):
        get_template(str(path))


def test_unknown_template_suggests_a_close_name():
    with pytest.raises(TemplateError, match=r"unknown template 'chtml' \(did you mean 'chatml'\?\)"):
        get_template("chtml")


def test_labels_from_offsets_marks_tokens_that_overlap_a_span():
    ids = [10, 11, 12, 13]
    offsets = [(0, 3), (3, 6), (6, 9), (9, 12)]
    assert labels_from_offsets(ids, offsets, [(4, 7)]) == [-100, 11, 12, -100]
    assert labels_from_offsets(ids, offsets, [(0, 3), (9, 12)]) == [10, -100, -100, 13]


def test_every_requested_family_is_built_in():
    wanted = {
        "llama2",
        "llama3",
        "chatml",
        "qwen2",
        "qwen2_5",
        "qwen3",
        "phi3",
        "gemma",
        "gemma2",
        "gemma3",
        "mistral",
        "zephyr",
        "vicuna",
        "alpaca",
        "deepseek",
        "deepseek_v2",
        "yi",
        "internlm2",
        "chatglm3",
        "falcon",
        "openchat",
        "solar",
        "granite",
        "empty",
        "tokenizer",
    }
    assert wanted <= set(available_templates())


@pytest.mark.parametrize(
    "name, text",
    [
        (
            "deepseek_v2_legacy",
            "<｜begin▁of▁sentence｜>Be brief.\n\nUser: Hi\n\nAssistant: Hello<｜end▁of▁sentence｜>User: Bye\n\nAssistant:",
        ),
        (
            "chatglm3",
            "[gMASK]sop<|system|>\n Be brief.<|user|>\n Hi<|assistant|>\n Hello<|user|>\n Bye<|assistant|>",
        ),
        (
            "internlm2",
            "<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n",
        ),
        (
            "qwen2",
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n",
        ),
    ],
)
def test_families_without_a_published_reference_render_their_documented_format(name, text):
    conversation = Conversation.from_messages(
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Bye"},
        ],
        system="Be brief.",
    )
    assert render_text(get_template(name).render(conversation, True)) == text


# ---- CLI ----------------------------------------------------------------------------------------------------------


def test_templates_cli_list_show_render(runner, tmp_path):
    listed = invoke(runner, "templates", "list").output
    assert "chatml" in listed and "llama3" in listed and "tokenizer" in listed
    shown = invoke(runner, "templates", "show", "chatml").output
    assert "<|im_start|>assistant\n[[2 plus 2 is 4.<|im_end|>]]\n" in shown
    gemma = invoke(runner, "templates", "show", "gemma3").output
    assert "no system turn: the system prompt is put in front of the first user message" in gemma
    gemma = invoke(runner, "templates", "show", "gemma").output
    assert "no system prompt: Gemma's own template refuses one" in gemma
    assert gemma.split("\n\n", 1)[1].startswith("<bos><start_of_turn>user\nWhat is 2 plus 2?<end_of_turn>")
    listed_mistral = [line for line in listed.splitlines() if line.startswith("mistral ")]
    assert listed_mistral == [line for line in listed_mistral if "alias of mistral_v2v3" in line] != []
    assert "Mistral-Nemo-Instruct-2407" in listed and "Phi-3.5-mini" in listed
    messages = tmp_path / "m.json"
    messages.write_text(json.dumps([{"role": "user", "content": "Hi"}]))
    rendered = invoke(
        runner, "templates", "render", "llama3", "--messages", messages, "--add-generation-prompt"
    )
    assert rendered.stdout == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    bad = invoke(runner, "templates", "render", "nope", "--messages", messages)
    assert bad.exit_code == 2 and "unknown template 'nope'" in bad.stderr
    messages.write_text(json.dumps([{"role": "assistant", "content": "first"}]))
    bad = invoke(runner, "templates", "render", "chatml", "--messages", messages)
    assert bad.exit_code == 2 and "roles must alternate" in bad.stderr and bad.stderr.count("\n") == 1


def test_templates_render_with_tools_and_the_tokenizer_template(runner, tmp_path, tiny_llama):
    conversation = tmp_path / "c.json"
    conversation.write_text(
        json.dumps(
            {
                "tools": [{"name": "f"}],
                "messages": [
                    {"role": "user", "content": "Hi"},
                    {
                        "role": "assistant",
                        "content": "",
                        "tool_calls": [{"name": "f", "arguments": {"x": 1}}],
                    },
                ],
            }
        )
    )
    rendered = invoke(runner, "templates", "render", "qwen3", "--messages", conversation).output
    assert rendered.endswith(
        '<|im_start|>assistant\n<think>\n\n</think>\n\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call><|im_end|>\n'
    )
    plain = tmp_path / "p.json"
    plain.write_text(json.dumps([{"role": "user", "content": "Hi"}]))
    missing = invoke(
        runner, "templates", "render", "tokenizer", "--messages", plain, "--tokenizer", tiny_llama
    )
    assert missing.exit_code == 2 and "has none" in missing.stderr
