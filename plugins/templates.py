"""Built-in conversation templates of the common model families (plugin ``templates``).

Registered through the ``register_templates`` catalog hook, so they are available to ``--template`` without
selecting the plugin. A template named after a model family writes that family's own special tokens
(``<s>``, ``<|im_start|>``, ``<|begin_of_text|>``...) and renders exactly the text of the family's own chat
template; the tests compare them, conversation for conversation, with the published templates.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from lmflow_core import (
    Conversation,
    Message,
    Segment,
    Template,
    TemplateError,
    TurnTemplate,
    hookimpl,
    render_text,
    tojson,
)

SYSTEM_FIRST_USER = "no system turn: the system prompt is put in front of the first user message"


def family(**base: Any) -> Callable[..., TurnTemplate]:
    """A maker of the templates of one family: ``make(name, description, **differences)``."""

    def make(name: str, description: str, **fields: Any) -> TurnTemplate:
        return TurnTemplate(name=name, description=description, **{**base, **fields})

    return make


# ChatML (``<|im_start|>role\\n...<|im_end|>\\n``): chatml, qwen2.
chatml = family(
    system="<|im_start|>system\n{content}<|im_end|>\n",
    user="<|im_start|>user\n{content}<|im_end|>\n",
    assistant_header="<|im_start|>assistant\n",
    assistant="{content}<|im_end|>",
    assistant_trailer="\n",
    stop_strings=("<|im_end|>",),
)
# Gemma instruct (``<bos>``, then ``<start_of_turn>user/model ... <end_of_turn>``): gemma, gemma2, gemma3.
gemma = family(
    prefix="<bos>",
    system=None,
    user="<start_of_turn>user\n{content}<end_of_turn>\n",
    assistant_header="<start_of_turn>model\n",
    assistant="{content}<end_of_turn>",
    assistant_trailer="\n",
    strip_content=True,
    stop_strings=("<end_of_turn>",),
    system_note="no system prompt: Gemma's own template refuses one",
)
# Mistral's instruct formats ([INST] ... [/INST] answer</s>), one per tokenizer version.
mistral = family(
    prefix="<s>",
    system=None,
    system_in_first_user="{content}\n\n",
    system_in_last_user=True,
    assistant="{content}</s>",
    stop_strings=("</s>",),
    system_note="put in front of the last user message, as Mistral's template does; a conversation that ends "
    "with an assistant message (training data) keeps no system prompt",
)
MISTRAL_SMALL_3_SYSTEM = (
    "You are Mistral Small 3, a Large Language Model (LLM) created by Mistral AI, a French startup headquartered "
    "in Paris.\nYour knowledge base was last updated on 2023-10-01. The current date is {today}.\n\nWhen you're "
    "not sure about some information, you say that you don't have the information and don't make up anything.\n"
    "If the user's question is not clear, ambiguous, or does not provide enough context for you to accurately "
    "answer the question, you do not try to answer it right away and you rather ask the user to clarify their "
    'request (e.g. "What are some good restaurants around me?" => "Where are you?" or "When is the next flight '
    'to Tokyo" => "Where do you travel from?")'
)
# Phi-3 and Phi-3.5 (``<|user|> ... <|end|>``).
phi3 = family(
    system="<|system|>\n{content}<|end|>\n",
    user="<|user|>\n{content}<|end|>\n",
    assistant_header="<|assistant|>\n",
    assistant="{content}<|end|>",
    assistant_trailer="\n",
    stop_strings=("<|end|>", "<|endoftext|>"),
)
# Phi-4 (``<|im_start|>role<|im_sep|>...<|im_end|>``, no newlines).
phi4 = family(
    system="<|im_start|>system<|im_sep|>{content}<|im_end|>",
    user="<|im_start|>user<|im_sep|>{content}<|im_end|>",
    assistant_header="<|im_start|>assistant<|im_sep|>",
    assistant="{content}<|im_end|>",
    stop_strings=("<|im_end|>",),
)
PHI4_REASONING_SYSTEM = (
    "You are Phi, a language model trained by Microsoft to help users. Your role as an assistant involves "
    "thoroughly exploring questions through a systematic thinking process before providing the final precise and "
    "accurate solutions. This requires engaging in a comprehensive cycle of analysis, summarizing, exploration, "
    "reassessment, reflection, backtracing, and iteration to develop well-considered thinking process. Please "
    "structure your response into two main sections: Thought and Solution using the specified format: <think> "
    "{Thought section} </think> {Solution section}. In the Thought section, detail your reasoning process in "
    "steps. Each step should include detailed considerations such as analysing questions, summarizing relevant "
    "findings, brainstorming new ideas, verifying the accuracy of the current steps, refining any errors, and "
    "revisiting previous steps. In the Solution section, based on various attempts, explorations, and reflections "
    "from the Thought section, systematically present the final solution that you deem correct. The Solution "
    "section should be logical, accurate, and concise and detail necessary steps needed to reach the conclusion. "
    "Now, try to solve the following question through the above guidelines:"
)


# --------------------------------------------------------------------------------------------------------------
# Families with tools: ChatML plus Hermes-style <tool_call> blocks (Qwen 2.5, Qwen 3), and Granite.
# --------------------------------------------------------------------------------------------------------------

TOOLS_PREAMBLE = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with "
    "function signatures within <tools></tools> XML tags:\n<tools>"
)
TOOLS_POSTAMBLE = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}'
    "\n</tool_call><|im_end|>\n"
)


@dataclass
class ChatMLToolsTemplate(Template):
    """Qwen's ChatML with tools: function signatures in the system turn, ``<tool_call>`` blocks in assistant
    turns, tool results grouped into a user turn as ``<tool_response>`` blocks.

    Attributes:
        default_system: used when the conversation has no system prompt (``None``: no system turn).
        tools_default_system: used in the tools system turn when there is no system prompt.
        thinking: Qwen 3 reasoning: ``<think>`` blocks in assistant turns after the last user query are kept
            (an empty one is added to the final turn), earlier ones are dropped.
        no_think: with ``thinking``, the generation prompt holds an empty ``<think>`` block (answer without
            reasoning), and so does the untrained header of a final turn that has no reasoning.
        think_prompt: with ``thinking``, the generation prompt opens a ``<think>`` block (``<think>\n\n``), as
            the later revision of Qwen 3's template and Qwen 3.5's do.
    """

    name: str = ""
    description: str = ""
    default_system: str | None = None
    tools_default_system: str | None = None
    thinking: bool = False
    no_think: bool = False
    think_prompt: bool = False
    stop_strings: tuple[str, ...] = ("<|im_end|>",)
    supports_tools: bool = True
    system_note: str = ""

    def render(
        self, conversation: Conversation, add_generation_prompt: bool = False, tokenizer: Any = None
    ) -> list[Segment]:
        self.check(conversation)
        messages = conversation.messages
        system = conversation.system
        segments: list[Segment] = []
        if conversation.tools:
            head = system if system is not None else self.tools_default_system
            text = "<|im_start|>system\n" + (head + "\n\n" if head is not None else "") + TOOLS_PREAMBLE
            text += "".join("\n" + tojson(tool) for tool in conversation.tools) + TOOLS_POSTAMBLE
            segments.append(Segment(text))
        elif (system if system is not None else self.default_system) is not None:
            text = system if system is not None else self.default_system
            segments.append(Segment(f"<|im_start|>system\n{text}<|im_end|>\n"))
        last_query = max((i for i, m in enumerate(messages) if m.role == "user"), default=-1)
        for i, message in enumerate(messages):
            if message.role == "user":
                segments.append(Segment(f"<|im_start|>user\n{message.content}<|im_end|>\n"))
            elif message.role == "tool":
                opens = i == 0 or messages[i - 1].role != "tool"
                closes = i == len(messages) - 1 or messages[i + 1].role != "tool"
                text = (
                    "<|im_start|>user" if opens else ""
                ) + f"\n<tool_response>\n{message.content}\n</tool_response>"
                segments.append(Segment(text + ("<|im_end|>\n" if closes else "")))
            else:
                header, body = self._assistant(message, i > last_query, i == len(messages) - 1)
                segments += [Segment(header), Segment(body + "<|im_end|>", trained=True), Segment("\n")]
        if add_generation_prompt:
            think = "<think>\n\n</think>\n\n" if self.no_think else "<think>\n\n" if self.think_prompt else ""
            segments.append(Segment("<|im_start|>assistant\n" + think))
        return [s for s in segments if s.text]

    def _assistant(self, message: Message, after_last_query: bool, last: bool) -> tuple[str, str]:
        """The untrained header and the trained body of an assistant turn."""
        header, content = "<|im_start|>assistant\n", message.content
        block = ""
        if self.thinking:
            reasoning = ""
            if "</think>" in content:
                reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
                content = content.split("</think>")[-1].lstrip("\n")
            if after_last_query and (last or reasoning):
                block = "<think>\n" + reasoning.strip("\n") + "\n</think>\n\n"
                content = content.lstrip("\n")
                if self.no_think and not reasoning:
                    header, block = header + block, ""  # what the no-think generation prompt already holds
        calls = []
        for n, call in enumerate(message.tool_calls):
            arguments = call.arguments if isinstance(call.arguments, str) else tojson(call.arguments)
            separator = "\n" if (n == 0 and content) or n > 0 else ""
            calls.append(
                f'{separator}<tool_call>\n{{"name": "{call.name}", "arguments": {arguments}}}\n</tool_call>'
            )
        # As in Qwen's template, a first tool call is set on a new line only after answer text (not after a
        # reasoning block).
        return header, block + content + "".join(calls)


@dataclass
class GraniteTemplate(Template):
    """IBM Granite 3: ``<|start_of_role|>role<|end_of_role|>...<|end_of_text|>``, with tools as an
    ``available_tools`` turn, tool calls as ``<|tool_call|>`` followed by their JSON, and ``tool_response``
    turns for their results."""

    name: str = "granite"
    description: str = "IBM Granite 3.x (<|start_of_role|>role<|end_of_role|>), with tool calls"
    stop_strings: tuple[str, ...] = ("<|end_of_text|>",)
    supports_tools: bool = True
    system_note: str = ""

    def render(
        self, conversation: Conversation, add_generation_prompt: bool = False, tokenizer: Any = None
    ) -> list[Segment]:
        self.check(conversation)
        segments: list[Segment] = []
        if conversation.tools:
            tools = "\n\n".join(_indented_json(tool) for tool in conversation.tools)
            segments.append(
                Segment(f"<|start_of_role|>available_tools<|end_of_role|>\n{tools}<|end_of_text|>\n")
            )
        if conversation.system is not None:
            segments.append(
                Segment(f"<|start_of_role|>system<|end_of_role|>{conversation.system}<|end_of_text|>\n")
            )
        for message in conversation.messages:
            if message.role == "user":
                segments.append(
                    Segment(f"<|start_of_role|>user<|end_of_role|>{message.content}<|end_of_text|>\n")
                )
            elif message.role == "tool":
                text = f"<|start_of_role|>tool_response<|end_of_role|>{message.content}<|end_of_text|>\n"
                segments.append(Segment(text))
            else:
                segments.append(Segment("<|start_of_role|>assistant<|end_of_role|>"))
                body = message.content
                if message.tool_calls:
                    # Granite writes a tool call as its own assistant turn.
                    if body:
                        segments += [Segment(body + "<|end_of_text|>", trained=True), Segment("\n")]
                        segments.append(Segment("<|start_of_role|>assistant<|end_of_role|>"))
                    body = "<|tool_call|>" + granite_tool_calls(message)
                segments += [Segment(body + "<|end_of_text|>", trained=True), Segment("\n")]
        if add_generation_prompt and conversation.messages:
            segments.append(Segment("<|start_of_role|>assistant<|end_of_role|>"))
        return [s for s in segments if s.text]


def granite_tool_calls(message: Message) -> str:
    """The JSON a Granite assistant writes after ``<|tool_call|>``."""
    return tojson([{"name": c.name, "arguments": c.arguments} for c in message.tool_calls])


def _indented_json(value: Any) -> str:
    import json

    return json.dumps(value, ensure_ascii=False, indent=4)


# --------------------------------------------------------------------------------------------------------------
# The model's own Jinja chat template
# --------------------------------------------------------------------------------------------------------------


@dataclass
class TokenizerTemplate(Template):
    """The tokenizer's own Jinja chat template (``tokenizer.chat_template``).

    Trained spans are found by rendering growing prefixes of the conversation: an assistant message is the
    text between the rendering of the messages before it (with the generation prompt) and the rendering that
    includes it, without trailing whitespace. A template for which that does not hold (one that rewrites
    earlier turns as the conversation grows) is an error, never an all-masked or all-trained example.
    """

    name: str = "tokenizer"
    description: str = (
        "The model's own Jinja chat template (tokenizer.chat_template); masks found by prefix rendering"
    )
    supports_tools: bool = True
    system_note: str = "as the model's own template does"

    def _apply(self, tokenizer: Any, conversation: Conversation, messages: list[dict], prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(
                messages, tools=conversation.tools, tokenize=False, add_generation_prompt=prompt
            )
        except Exception as exc:  # the model's template raised (e.g. "roles must alternate")
            raise TemplateError(f"the tokenizer's chat template failed: {exc}") from exc

    def render(
        self, conversation: Conversation, add_generation_prompt: bool = False, tokenizer: Any = None
    ) -> list[Segment]:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise TemplateError(
                "template 'tokenizer' needs a tokenizer with a chat template and this one has none",
                "choose a named template (see `lmflow templates list`)",
            )
        self.check(conversation)
        messages = conversation.to_dicts()
        full = self._apply(tokenizer, conversation, messages, add_generation_prompt)
        segments, position = [], 0
        offset = 1 if conversation.system is not None else 0
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self._apply(tokenizer, conversation, messages[:i], True) if i else ""
            through = self._apply(tokenizer, conversation, messages[: i + 1], False)
            if not (through.startswith(before) and full.startswith(through) and len(before) >= position):
                raise TemplateError(
                    f"the masks of the tokenizer's chat template cannot be determined at message {i - offset}: "
                    "its rendering of a conversation is not the rendering of the conversation before it plus "
                    "the new turn",
                    "choose a named template for this model family",
                )
            end = len(through.rstrip())
            if end <= len(before):
                raise TemplateError(f"the tokenizer's chat template renders message {i - offset} as empty")
            segments += [
                Segment(full[position : len(before)]),
                Segment(full[len(before) : end], trained=True),
            ]
            position = end
        segments.append(Segment(full[position:]))
        return [s for s in segments if s.text]

    def stop_strings_for(self, tokenizer: Any) -> tuple[str, ...]:
        return (tokenizer.eos_token,) if tokenizer is not None and tokenizer.eos_token else ()


# --------------------------------------------------------------------------------------------------------------
# The families
# --------------------------------------------------------------------------------------------------------------

QWEN25_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

TEMPLATES: list[Template] = [
    chatml(
        "chatml",
        "ChatML convention (<|im_start|>role ... <|im_end|>), message text stripped; the demo model's format",
        strip_content=True,
    ),
    chatml(
        "qwen2",
        "Qwen2-Instruct: ChatML with the default system prompt 'You are a helpful assistant.'",
        default_system="You are a helpful assistant.",
    ),
    ChatMLToolsTemplate(
        name="qwen2_5",
        description="Qwen2.5-Instruct (also Coder, Math): ChatML, default system prompt, tool calls",
        default_system=QWEN25_SYSTEM,
        tools_default_system=QWEN25_SYSTEM,
        system_note=f"without one, the system prompt is '{QWEN25_SYSTEM}'",
    ),
    ChatMLToolsTemplate(
        name="qwen3",
        description="Qwen3 first release (2025-04): ChatML, <think> reasoning kept after the last user "
        "query, tool calls; the prompt ends '<|im_start|>assistant\\n'",
        thinking=True,
    ),
    ChatMLToolsTemplate(
        name="qwen3_thinking",
        description="Qwen3 later template revision, Qwen3.5: as qwen3, the prompt opens a <think> block",
        thinking=True,
        think_prompt=True,
    ),
    ChatMLToolsTemplate(
        name="qwen3_no_think",
        description="Qwen3 / Qwen3.5 with enable_thinking=False: the prompt ends with an empty <think> block",
        thinking=True,
        no_think=True,
    ),
    chatml("yi", "Yi chat: ChatML, message text kept as is"),
    chatml("internlm2", "InternLM2 chat: <s> then ChatML", prefix="<s>"),
    TurnTemplate(
        name="llama2",
        description="Llama-2-chat: <s>[INST] ... [/INST] answer </s> per turn, <<SYS>> in the first user turn; "
        "tokenized per turn as Meta's code does",
        system=None,
        system_in_first_user="<<SYS>>\n{content}\n<</SYS>>\n\n",
        user="<s>[INST] {content} [/INST]",
        assistant=" {content} </s>",
        strip_content=True,
        strip_system=False,
        tokenize_per_bos=True,
        stop_strings=("</s>",),
        system_note="the system prompt goes into the first [INST] as a <<SYS>> block",
    ),
    TurnTemplate(
        name="llama3",
        description="Meta-Llama-3-Instruct (<|begin_of_text|>, <|start_header_id|>role<|end_header_id|> ... "
        "<|eot_id|>); no Llama 3.1+ date preamble",
        prefix="<|begin_of_text|>",
        system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
        user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
        assistant_header="<|start_header_id|>assistant<|end_header_id|>\n\n",
        assistant="{content}<|eot_id|>",
        strip_content=True,
        stop_strings=("<|eot_id|>", "<|end_of_text|>"),
    ),
    mistral(
        "mistral_v1",
        "Mistral-7B-Instruct-v0.1, Mixtral-8x7B-Instruct-v0.1: <s> [INST] system\\n\\nuser [/INST] answer</s>",
        system_in_last_user=False,
        user=" [INST] {content} [/INST]",
        assistant=" {content}</s>",
        system_note="put in front of the first user message",
    ),
    mistral(
        "mistral_v2v3",
        "Mistral-7B-Instruct-v0.2/v0.3, Mixtral-8x22B-Instruct, Codestral-22B: <s>[INST] user[/INST] "
        "answer</s>, system prompt in the last user turn",
        user="[INST] {content}[/INST]",
        assistant=" {content}</s>",
        strip_assistant=True,
    ),
    mistral(
        "mistral_v3_tekken",
        "Mistral-Nemo-Instruct-2407 (Tekken tokenizer): <s>[INST]user[/INST]answer</s>, system prompt in "
        "the last user turn",
        user="[INST]{content}[/INST]",
    ),
    mistral(
        "mistral_v7_tekken",
        "Mistral-Small-24B-Instruct-2501 (Mistral Small 3): <s>[SYSTEM_PROMPT]...[/SYSTEM_PROMPT], dated "
        "default system prompt, [INST]user[/INST]answer</s>",
        system="[SYSTEM_PROMPT]{content}[/SYSTEM_PROMPT]",
        system_in_first_user=None,
        system_in_last_user=False,
        user="[INST]{content}[/INST]",
        default_system=MISTRAL_SMALL_3_SYSTEM,
        system_note="without one, Mistral Small 3's default system prompt (with today's date) is used",
    ),
    gemma("gemma", "Gemma 1/1.1 and Gemma 2 instruct: <bos><start_of_turn>user/model ... <end_of_turn>"),
    gemma(
        "gemma3",
        "Gemma 3 / Gemma 3n instruct: as gemma, the system prompt kept as is before the first user text",
        system_in_first_user="{content}\n\n",
        system_outside_strip=True,
        strip_system=False,
        system_note=SYSTEM_FIRST_USER,
    ),
    phi3(
        "phi3",
        "Phi-3-mini/-medium instruct: <s><|user|>\\n...<|end|>\\n<|assistant|>\\n answer<|end|>",
        prefix="<s>",
        user="<|user|>\n{content}<|end|>\n<|assistant|>\n",
        assistant_header="",
    ),
    phi3(
        "phi35",
        "Phi-3.5-mini/-MoE instruct: as phi3 without <s>; an empty system prompt is left out",
        skip_empty_system=True,
    ),
    phi3(
        "phi3_small",
        "Phi-3-small: <|endoftext|>, then <|role|>\\n...<|end|>, message text stripped",
        prefix="<|endoftext|>",
        strip_content=True,
    ),
    phi4("phi4", "Phi-4 (14B): <|im_start|>role<|im_sep|>...<|im_end|>, no newlines"),
    phi4(
        "phi4_reasoning",
        "Phi-4-reasoning(-plus): as phi4, with Phi's reasoning system prompt by default",
        default_system=PHI4_REASONING_SYSTEM,
        system_note="without one, Phi-4-reasoning's default system prompt is used",
    ),
    TurnTemplate(
        name="zephyr",
        description="Zephyr (<|user|> ... </s>)",
        system="<|system|>\n{content}</s>\n",
        user="<|user|>\n{content}</s>\n",
        assistant_header="<|assistant|>\n",
        assistant="{content}</s>",
        assistant_trailer="\n",
        strip_content=True,
        stop_strings=("</s>",),
    ),
    TurnTemplate(
        name="vicuna",
        description="Vicuna v1.1+ (USER: ... ASSISTANT: ...</s>)",
        prefix="<s>",
        system="{content}\n\n",
        user="USER: {content}\n",
        assistant_header="ASSISTANT:",
        assistant=" {content}</s>",
        assistant_trailer="\n",
        strip_content=True,
        stop_strings=("</s>",),
    ),
    TurnTemplate(
        name="alpaca",
        description="Alpaca (### Instruction: / ### Response:)",
        prefix="<s>",
        system="{content}\n\n",
        user="### Instruction:\n{content}\n\n",
        assistant_header="### Response:\n",
        assistant="{content}</s>",
        assistant_trailer="\n\n",
        strip_content=True,
        stop_strings=("</s>",),
    ),
    TurnTemplate(
        name="falcon",
        description="Falcon instruct (User: / Assistant:); blank lines in messages are squeezed",
        system="{content}",
        user="\n\nUser: {content}",
        assistant_header="\n\nAssistant:",
        assistant=" {content}",
        strip_content=True,
        content_replacements=(("\r\n", "\n"), ("\n\n", "\n")),
        stop_strings=("\nUser:",),
        system_note="no end-of-turn marker: generation stops at the next 'User:'",
    ),
    TurnTemplate(
        name="openchat",
        description="OpenChat 3.5 (GPT4 Correct User: ... <|end_of_turn|>)",
        prefix="<s>",
        system="{content}<|end_of_turn|>",
        user="GPT4 Correct User: {content}<|end_of_turn|>",
        assistant_header="GPT4 Correct Assistant:",
        assistant=" {content}<|end_of_turn|>",
        strip_system=True,
        stop_strings=("<|end_of_turn|>",),
    ),
    TurnTemplate(
        name="solar",
        description="SOLAR instruct (### User: / ### Assistant:)",
        prefix="<s>",
        system="### System:\n{content}\n\n",
        user="### User:\n{content}\n\n",
        assistant_header="### Assistant:\n",
        assistant="{content}\n\n",
        strip_content=True,
        stop_strings=("### User:",),
    ),
    TurnTemplate(
        name="amberchat",
        description="AmberChat (###Human: / ###Assistant:)",
        prefix="<s>",
        system="{content}\n",
        user="###Human: {content}\n",
        assistant_header="###Assistant:",
        assistant=" {content}\n",
        strip_content=True,
        stop_strings=("\n###Human",),
    ),
    TurnTemplate(
        name="chatqa",
        description="NVIDIA ChatQA (System: / User: / Assistant:)",
        prefix="<|begin_of_text|>",
        system="System: {content}",
        user="\n\nUser: {content}",
        assistant_header="\n\nAssistant:",
        assistant=" {content}",
        strip_content=True,
        stop_strings=("<|eot_id|>", "\n\nUser:"),
        system_note="no end-of-turn marker: generation stops at 'User:'",
    ),
    TurnTemplate(
        name="saiga",
        description="Saiga (<s>role\\n...</s>, the assistant is 'bot')",
        system="<s>system\n{content}</s>",
        user="<s>user\n{content}</s>",
        assistant_header="<s>bot\n",
        assistant="{content}</s>",
        strip_content=True,
        stop_strings=("</s>",),
    ),
    TurnTemplate(
        name="deepseek_v3",
        description="DeepSeek-V3 / R1: <｜begin▁of▁sentence｜>system<｜User｜>...<｜Assistant｜>...<｜end▁of▁sentence｜>; "
        "reasoning before </think> is dropped from answers, as their template does",
        prefix="<｜begin▁of▁sentence｜>",
        system="{content}",
        user="<｜User｜>{content}",
        assistant_header="<｜Assistant｜>",
        assistant="{content}<｜end▁of▁sentence｜>",
        drop_reasoning=True,
        stop_strings=("<｜end▁of▁sentence｜>",),
    ),
    TurnTemplate(
        name="deepseek_v2",
        description="DeepSeek-V2-Chat-0628, V2.5: <｜begin▁of▁sentence｜>system\\n\\n<｜User｜>...<｜Assistant｜>..."
        "<｜end▁of▁sentence｜>",
        prefix="<｜begin▁of▁sentence｜>",
        system="{content}\n\n",
        user="<｜User｜>{content}",
        assistant_header="<｜Assistant｜>",
        assistant="{content}<｜end▁of▁sentence｜>",
        stop_strings=("<｜end▁of▁sentence｜>",),
    ),
    TurnTemplate(
        name="deepseek_v2_legacy",
        description="DeepSeek-V2-Chat and V2-Lite-Chat first release (User: ... Assistant: ...<｜end▁of▁sentence｜>)",
        prefix="<｜begin▁of▁sentence｜>",
        system="{content}\n\n",
        user="User: {content}\n\n",
        assistant_header="Assistant:",
        assistant=" {content}<｜end▁of▁sentence｜>",
        stop_strings=("<｜end▁of▁sentence｜>",),
    ),
    TurnTemplate(
        name="chatglm3",
        description="ChatGLM3 ([gMASK]sop<|user|>\\n ...<|assistant|>\\n ...)",
        prefix="[gMASK]sop",
        system="<|system|>\n {content}",
        user="<|user|>\n {content}",
        assistant_header="<|assistant|>",
        assistant="\n {content}",
        stop_strings=("<|user|>", "<|observation|>"),
        system_note="no end-of-turn marker: generation stops at the next <|user|>",
    ),
    GraniteTemplate(),
    TokenizerTemplate(),
    TurnTemplate(
        name="empty",
        description="Plain concatenation of the messages; each assistant turn ends with the tokenizer's EOS",
        system="{content}",
        user="{content}",
        assistant="{content}{eos_token}",
    ),
]


def alias(name: str, target: str) -> Template:
    """The template ``target`` under another name, kept so that configs using the name keep working."""
    template = next(t for t in TEMPLATES if t.name == target)
    return replace(template, name=name, description=f"alias of {target}: {template.description}")


TEMPLATES += [
    alias("mistral", "mistral_v2v3"),
    alias("gemma2", "gemma"),
    alias("qwen3_5", "qwen3_thinking"),
    alias("deepseek", "deepseek_v3"),
]


@hookimpl
def register_templates() -> list[Template]:
    return list(TEMPLATES)


__all__ = ["TEMPLATES", "ChatMLToolsTemplate", "GraniteTemplate", "TokenizerTemplate", "render_text"]
