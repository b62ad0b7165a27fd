"""Inference: decoding options, streaming, `lmflow generate`, `lmflow chat`, adapters and `lmflow evaluate`."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import conversations, invoke, write_json
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmflow_core.catalog import get_template
from lmflow_core.generate import GenerationOptions, TextStream, visible_text
from lmflow_core.inference import open_session
from lmflow_core.templates import Conversation, render_text

LMFLOW = Path(sys.executable).with_name("lmflow")


# ---- visible text and streaming -----------------------------------------------------------------------------------


def test_visible_text_cuts_at_stops_and_hides_special_tokens():
    stops, specials = ("<|im_end|>", "\nUser:"), ("<|im_end|>", "<|im_start|>")
    assert visible_text(" Paris.<|im_end|>\n<|im_start|>user", stops, specials, True) == ("Paris.", True)
    assert visible_text("Paris.\nUser: more", stops, specials, True) == ("Paris.", True)
    # While streaming, a tail that could become a stop string or a special token is held back.
    assert visible_text("Paris.\nUs", stops, specials, False) == ("Paris.", False)
    assert visible_text("Paris.<|im_e", stops, specials, False) == ("Paris.", False)
    assert visible_text("Paris. ", stops, specials, False) == ("Paris.", False)
    assert visible_text("caf\ufffd", stops, specials, False) == ("caf", False)


def test_streamed_pieces_add_up_to_the_final_text(chat_model):
    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    text = "The answer is 42.<|im_end|>\n<|im_start|>user\nnext"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = []
    stream = TextStream(tokenizer, prompt_length=3, stops=("<|im_end|>",), on_text=pieces.append)
    stream.put(torch.tensor([1, 2, 3]))  # the prompt, as model.generate passes it first
    for token in ids:
        stream.put(torch.tensor([token]))
    stream.end()
    assert "".join(pieces) == "The answer is 42." and len(pieces) > 3


# ---- sessions -------------------------------------------------------------------------------------------------------


def test_session_uses_the_stored_template_and_stops_at_the_end_of_turn(chat_model):
    session = open_session(str(chat_model))
    assert session.template_name == "chatml"
    messages = [{"role": "user", "content": "What is 3 plus 1?"}]
    result = session.chat(messages, GenerationOptions(max_new_tokens=12))
    prompt = render_text(get_template("chatml").render(Conversation.from_messages(messages), True))
    ids = session.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    expected = session.model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=12,
        do_sample=False,
        pad_token_id=session.tokenizer.pad_token_id,
        eos_token_id=session.tokenizer.eos_token_id,
    )
    raw = session.tokenizer.decode(expected[0, ids.shape[1] :], skip_special_tokens=False)
    assert (
        result.text
        == visible_text(raw, ("<|im_end|>",), tuple(session.tokenizer.all_special_tokens), True)[0]
    )
    assert result.prompt_tokens == ids.shape[1] and result.finish_reason in ("stop", "length")


def test_an_adapter_directory_generates_like_its_merged_model(chat_model, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(chat_model)
    peft_model = get_peft_model(
        base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    (adapter / "lmflow_run.json").write_text(json.dumps({"template": "chatml"}))
    merged = peft_model.merge_and_unload()
    session = open_session(str(adapter))
    assert type(session.model).__name__ == "PeftModelForCausalLM" and session.template_name == "chatml"
    prompt = "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    ids = session.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(session.model(ids).logits, merged(ids).logits, atol=1e-4)


def test_missing_model_and_template_problems_are_one_line_errors(runner, tiny_llama, tmp_path):
    result = invoke(runner, "generate", tmp_path / "nope", "--prompt", "x")
    assert result.exit_code == 1 and "does not exist" in result.stderr and result.stderr.count("\n") == 1
    messages = write_json(tmp_path / "m.json", [{"role": "user", "content": "hi"}])
    result = invoke(runner, "generate", tiny_llama, "--messages", messages)
    assert result.exit_code == 1 and "has no conversation template" in result.stderr
    result = invoke(runner, "generate", tiny_llama, "--prompt", "x", "--greedy", "--temperature", "0.5")
    assert result.exit_code == 1 and "--greedy contradicts --temperature" in result.stderr


# ---- lmflow generate / chat -------------------------------------------------------------------------------------------


def test_generate_with_a_prompt_and_with_messages(runner, chat_model, tmp_path):
    by_prompt = invoke(
        runner, "generate", chat_model, "--prompt", "What is", "--max-new-tokens", "5", "--no-stream"
    )
    assert by_prompt.exit_code == 0, by_prompt.stderr
    messages = write_json(tmp_path / "m.json", [{"role": "user", "content": "What is 3 plus 1?"}])
    streamed = invoke(runner, "generate", chat_model, "--messages", messages, "--max-new-tokens", "12")
    whole = invoke(
        runner, "generate", chat_model, "--messages", messages, "--max-new-tokens", "12", "--no-stream"
    )
    assert streamed.exit_code == whole.exit_code == 0
    assert streamed.stdout == whole.stdout  # streaming shows exactly the final text
    expected = (
        open_session(str(chat_model))
        .chat(json.loads(messages.read_text()), GenerationOptions(max_new_tokens=12))
        .text
    )
    assert whole.stdout == expected + "\n"
    sampled = [
        invoke(
            runner,
            "generate",
            chat_model,
            "--messages",
            messages,
            "--temperature",
            "2.0",
            "--seed",
            str(seed),
            "--max-new-tokens",
            "12",
        ).output
        for seed in (1, 1, 2)
    ]
    assert sampled[0] == sampled[1] != sampled[2]


@pytest.mark.slow
def test_chat_through_a_pipe_keeps_history_and_obeys_commands(chat_model):
    script = "What is 1 plus 1?\n/system Answer in one word.\nAnd 2 plus 2?\n/reset\nWhat is 5 plus 1?\n/nonsense\n/exit\nignored\n"
    done = subprocess.run(
        [str(LMFLOW), "chat", str(chat_model), "--max-new-tokens", "8"],
        input=script,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[1] == "(system prompt set)" and lines[3] == "(conversation cleared)"
    assert lines[5].startswith("(unknown command /nonsense")
    assert len(lines) == 6  # three replies and three notices; nothing after /exit
    # Each reply is what the session gives for that conversation (history, system prompt, reset).
    session = open_session(str(chat_model))
    options = GenerationOptions(max_new_tokens=8)
    first = session.chat([{"role": "user", "content": "What is 1 plus 1?"}], options).text
    second = session.chat(
        Conversation.from_messages(
            [
                {"role": "user", "content": "What is 1 plus 1?"},
                {"role": "assistant", "content": first},
                {"role": "user", "content": "And 2 plus 2?"},
            ],
            system="Answer in one word.",
        ),
        options,
    ).text
    # /reset clears the history; the system prompt stays.
    third = session.chat(
        Conversation.from_messages(
            [{"role": "user", "content": "What is 5 plus 1?"}], system="Answer in one word."
        ),
        options,
    ).text
    assert [lines[0], lines[2], lines[4]] == [first, second, third]


# ---- lmflow evaluate ----------------------------------------------------------------------------------------------------


def direct_nll(model, ids: list[int], labels: list[int], window: int, stride: int) -> float:
    """Each scored token's NLL computed on its own, with exactly the context its window gives it."""
    total, scored_until = 0.0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        for p in range(max(begin + 1, scored_until), end):
            if labels[p] == -100:
                continue
            with torch.no_grad():
                logits = model(torch.tensor([ids[begin:p]])).logits[0, -1].double()
            total -= torch.log_softmax(logits, -1)[ids[p]].item()
        scored_until = end
        if end == len(ids):
            break
    return total


def test_evaluate_matches_a_direct_computation_with_a_sliding_window(runner, chat_model, tmp_path):
    texts = [{"text": "one two three four five six seven eight nine ten " * 6}, {"text": "short text here"}]
    data = write_json(tmp_path / "t.json", {"type": "text_only", "instances": texts})
    report_path = tmp_path / "report.json"
    result = invoke(
        runner,
        "evaluate",
        chat_model,
        "--dataset",
        data,
        "--window",
        "32",
        "--stride",
        "12",
        "--output",
        report_path,
    )
    assert result.exit_code == 0, result.stderr
    assert "nll_per_sample" in result.output and "perplexity" in result.output
    report = json.loads(report_path.read_text())
    assert report["examples_longer_than_window"] == 1 and report["window"] == 32 and report["stride"] == 12

    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    model = AutoModelForCausalLM.from_pretrained(chat_model)
    sums, counts = [], []
    for item in texts:
        ids = tokenizer(item["text"])["input_ids"] + [tokenizer.eos_token_id]
        sums.append(direct_nll(model, ids, ids, 32, 12))
        counts.append(len(ids) - 1)  # every token but the first is scored exactly once
    metrics = report["metrics"]
    assert metrics["eval_tokens"] == sum(counts)
    assert math.isclose(metrics["nll_per_sample"], sum(sums) / 2, rel_tol=1e-4)
    assert math.isclose(metrics["nll_per_token"], sum(sums) / sum(counts), rel_tol=1e-4)
    assert math.isclose(metrics["perplexity"], math.exp(sum(sums) / sum(counts)), rel_tol=1e-4)


def test_evaluate_scores_only_assistant_tokens_of_conversations(chat_model, tmp_path):
    from lmflow_core.evaluation import evaluate_dataset

    data = write_json(tmp_path / "c.json", {"type": "conversation", "instances": conversations(4)})
    session = open_session(str(chat_model))
    report = evaluate_dataset(session, str(data))
    template = get_template("chatml")
    tokenizer = session.tokenizer
    expected_tokens, total = 0, 0.0
    for record in conversations(4):
        segments = template.render(Conversation.from_messages(record["messages"]), False, tokenizer)
        from lmflow_core.templates import encode_segments

        [ids], [labels] = encode_segments(tokenizer, [segments])
        with torch.no_grad():
            logprobs = torch.log_softmax(session.model(torch.tensor([ids])).logits[0, :-1].double(), -1)
        for p in range(1, len(ids)):
            if labels[p] != -100:
                total -= logprobs[p - 1, ids[p]].item()
                expected_tokens += 1
    assert report["metrics"]["eval_tokens"] == expected_tokens
    assert math.isclose(report["metrics"]["nll_per_sample"], total / 4, rel_tol=1e-4)
