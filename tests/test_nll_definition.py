"""`lmflow evaluate --nll-definition lmflow` against a re-implementation of LMFlow's
`Evaluator._evaluate_nll`, and the default (`training`) against it: they differ by the EOS term, exactly."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from helpers import assert_one_line_error, conversations, invoke, write_json
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmflow_core import open_session
from lmflow_core.errors import LmflowError
from lmflow_core.evaluation import evaluate_dataset


def long_text(words: int, seed: int = 0) -> str:
    vocabulary = "the sea is deep and blue while ships sail over waves under a wide sky with birds".split()
    pick = random.Random(seed).choice
    return " ".join(pick(vocabulary) for _ in range(words))


def lmflow_reference(model, tokenizer, records, data_type, block_size=512, max_length=None, prompt="{input}"):
    """LMFlow's NLL, written from its evaluator: tokenize without special tokens, then per sample a window
    of ``max_length`` tokens every ``block_size`` tokens, each scoring its last ``end - prev_end`` labels with
    the model's mean loss times the number of valid labels; the sum over samples divided by their number."""
    samples = []
    for record in records:
        if data_type == "text_only":
            ids = tokenizer(record["text"], add_special_tokens=False)["input_ids"]
            labels = list(ids)
        else:
            source = tokenizer(prompt.format(input=record["input"]), add_special_tokens=False)["input_ids"]
            target = tokenizer(record["output"], add_special_tokens=False)["input_ids"]
            ids, labels = source + target, [-100] * len(source) + target
        samples.append((torch.tensor([ids], dtype=torch.long), torch.tensor([labels], dtype=torch.long)))
    if max_length is None:
        try:
            max_length = min(model.config.n_positions, tokenizer.model_max_length)
        except AttributeError:
            max_length = min(1024, tokenizer.model_max_length)
    nlls = []
    with torch.no_grad():
        for input_ids, all_labels in samples:
            seq_len, prev_end = input_ids.size(1), 0
            for begin in range(0, seq_len, block_size):
                end = min(begin + max_length, seq_len)
                trg_len = end - prev_end
                labels = all_labels[:, begin:end].clone()
                labels[:, :-trg_len] = -100
                valid = int(torch.count_nonzero(labels >= 0)) - (1 if labels[0, 0] != -100 else 0)
                if torch.all(labels == -100):
                    nlls.append(0.0)
                else:
                    nlls.append(model(input_ids[:, begin:end], labels=labels).loss.item() * valid)
                prev_end = end
                if end == seq_len:
                    break
    return sum(nlls) / len(samples)


def eos_term(model, tokenizer, records, data_type) -> float:
    """Mean over samples of -log p(EOS | the whole text, or prompt and answer), from one forward pass each."""
    total = 0.0
    with torch.no_grad():
        for record in records:
            text = record["text"] if data_type == "text_only" else record["input"]
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if data_type == "text2text":
                ids = ids + tokenizer(record["output"], add_special_tokens=False)["input_ids"]
            logits = model(torch.tensor([ids])).logits[0, -1].double()
            total -= torch.log_softmax(logits, -1)[tokenizer.eos_token_id].item()
    return total / len(records)


def text_records(n: int = 12) -> list[dict]:
    return [{"text": f"Sentence number {i} is about the sea."} for i in range(n)]


def text2text_records(long_words: tuple[int, int] = (120, 150)) -> list[dict]:
    """Eight short question-answer pairs and a long one (``long_words``: words of its input and output)."""
    records = [{"input": f"What is {i} plus 1?", "output": f" It is {i + 1}."} for i in range(8)]
    source, target = long_words
    records.append({"input": long_text(source, seed=1), "output": " " + long_text(target, seed=2)})
    return records


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2):
    """The tiny GPT-2's path, model and tokenizer, loaded once."""
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    return tiny_gpt2, model, AutoTokenizer.from_pretrained(tiny_gpt2)


# (window, stride): LMFlow's defaults (256 = n_positions here, 512: windows with a gap between them), windows
# that overlap, windows end to end (each one's first token unscored) and windows with gaps.
WINDOWINGS = [(None, None), (32, 12), (32, 32), (24, 40)]


@pytest.mark.parametrize(("window", "stride"), WINDOWINGS)
def test_lmflow_definition_equals_lmflows_loop_on_text_only(gpt2, tmp_path, window, stride):
    path, model, tokenizer = gpt2
    # Past the gap of LMFlow's default windows (256 tokens every 512), or several times the explicit window.
    records = [*text_records(), {"text": long_text(260) if window is None else long_text(60, seed=3)}]
    length = len(tokenizer(records[-1]["text"])["input_ids"])
    assert length > (600 if window is None else 4 * window)
    assert (length - 1) % (stride or 512)  # no last window of one token (see the NaN test below)
    data = write_json(tmp_path / "t.json", {"type": "text_only", "instances": records})
    report = evaluate_dataset(
        open_session(str(path)), str(data), window=window, stride=stride, nll_definition="lmflow"
    )
    expected = lmflow_reference(model, tokenizer, records, "text_only", stride or 512, window)
    assert report["nll_definition"] == "lmflow" and report["window"] == (window or 256)
    assert report["stride"] == (stride or 512) and report["records"] == len(records)
    assert report["metrics"]["eval_samples"] == len(records)
    assert math.isclose(report["metrics"]["nll_per_sample"], expected, rel_tol=1e-5)


@pytest.mark.parametrize(("window", "stride"), WINDOWINGS)
def test_lmflow_definition_equals_lmflows_loop_on_text2text(gpt2, tmp_path, window, stride):
    path, model, tokenizer = gpt2
    # The long pair's input fills LMFlow's first default window and its output runs past the gap after it.
    records = text2text_records() if window is None else text2text_records((20, 30))
    long = records[-1]
    length = sum(len(tokenizer(long[k], add_special_tokens=False)["input_ids"]) for k in ("input", "output"))
    assert (length - 1) % (stride or 512) and length > (600 if window is None else 4 * window)
    data = write_json(tmp_path / "t2t.json", {"type": "text2text", "instances": records})
    report = evaluate_dataset(
        open_session(str(path)), str(data), window=window, stride=stride, nll_definition="lmflow"
    )
    expected = lmflow_reference(model, tokenizer, records, "text2text", stride or 512, window)
    assert report["metrics"]["eval_samples"] == len(records)
    assert math.isclose(report["metrics"]["nll_per_sample"], expected, rel_tol=1e-5)


def test_an_example_with_nothing_to_predict_counts_zero_where_lmflows_loop_gives_nan(gpt2, tmp_path):
    # LMFlow multiplies the mean loss over no token (NaN) by zero valid labels: one such example (a text of
    # one token, or a last window of one token) makes its whole figure NaN. Here it adds 0 and counts.
    path, model, tokenizer = gpt2
    records = text_records()
    one_token = {"text": "the"}
    assert len(tokenizer(one_token["text"], add_special_tokens=False)["input_ids"]) == 1
    assert math.isnan(lmflow_reference(model, tokenizer, [*records, one_token], "text_only"))
    data = write_json(tmp_path / "t.json", {"type": "text_only", "instances": [*records, one_token]})
    report = evaluate_dataset(open_session(str(path)), str(data), nll_definition="lmflow")
    expected = lmflow_reference(model, tokenizer, records, "text_only") * len(records) / (len(records) + 1)
    assert math.isclose(report["metrics"]["nll_per_sample"], expected, rel_tol=1e-5)


def test_the_prompt_structure_formats_text2text_inputs_as_lmflows_does(gpt2, tmp_path):
    path, model, tokenizer = gpt2
    records = text2text_records()[:8]
    data = write_json(tmp_path / "t2t.json", {"type": "text2text", "instances": records})
    prompt = "Question: {input}\nAnswer:"
    session = open_session(str(path))
    report = evaluate_dataset(session, str(data), nll_definition="lmflow", prompt_structure=prompt)
    plain = evaluate_dataset(session, str(data), nll_definition="lmflow")
    expected = lmflow_reference(model, tokenizer, records, "text2text", prompt=prompt)
    assert report["prompt_structure"] == prompt
    assert math.isclose(report["metrics"]["nll_per_sample"], expected, rel_tol=1e-5)
    assert not math.isclose(plain["metrics"]["nll_per_sample"], expected, rel_tol=1e-3)


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
@pytest.mark.parametrize("data_type", ["text_only", "text2text"])
def test_the_default_differs_from_lmflows_by_the_eos_term_exactly(
    request, tmp_path, text_data, model_type, data_type
):
    path = request.getfixturevalue(f"tiny_{model_type}")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    # The demo tokenizer adds no BOS: with one, the default would also score the first token (after the BOS).
    assert tokenizer("the sea")["input_ids"] == tokenizer("the sea", add_special_tokens=False)["input_ids"]
    if data_type == "text_only":
        records = json.loads(text_data.read_text())["instances"]
    else:
        records = text2text_records()[:8]
    data = write_json(tmp_path / "d.json", {"type": data_type, "instances": records})
    session = open_session(str(path))
    default = evaluate_dataset(session, str(data))
    lmflow = evaluate_dataset(session, str(data), nll_definition="lmflow")
    assert default["nll_definition"] == "training"
    assert default["metrics"]["eval_tokens"] == lmflow["metrics"]["eval_tokens"] + len(records)
    difference = default["metrics"]["nll_per_sample"] - lmflow["metrics"]["nll_per_sample"]
    assert math.isclose(
        difference, eos_term(model, tokenizer, records, data_type), rel_tol=1e-4, abs_tol=1e-5
    )


def test_the_cli_option_writes_lmflows_number(runner, tiny_gpt2, text_data, tmp_path):
    out = tmp_path / "report.json"
    args = ["evaluate", tiny_gpt2, "--dataset", text_data, "--max-samples", "10", "--output", out]
    result = invoke(runner, *args, "--nll-definition", "lmflow")
    assert result.exit_code == 0, result.output
    assert "NLL definition: lmflow" in result.stdout
    report = json.loads(out.read_text())
    model, tokenizer = (
        AutoModelForCausalLM.from_pretrained(tiny_gpt2),
        AutoTokenizer.from_pretrained(tiny_gpt2),
    )
    records = json.loads(text_data.read_text())["instances"][:10]
    expected = lmflow_reference(model.eval(), tokenizer, records, "text_only")
    assert math.isclose(report["metrics"]["nll_per_sample"], expected, rel_tol=1e-5)
    assert "NLL definition: training" in invoke(runner, *args).stdout


@pytest.mark.parametrize(
    ("flags", "fragments"),
    [
        (["--nll-definition", "lmflw"], ["unknown NLL definition 'lmflw'", "did you mean 'lmflow'"]),
        (["--nll-definition", "eos"], ["unknown NLL definition 'eos'", "training, lmflow"]),
        (["--prompt-structure", "Q: {input}"], ["applies only to LMFlow's definition", "--nll-definition"]),
        (["--nll-definition", "lmflow", "--prompt-structure", "Q: {inp}"], ["cannot be filled in"]),
        (["--nll-definition", "lmflow", "--prompt-structure", "Q:"], ["has no {input}"]),
        (["--window", "16", "--stride", "16"], ["--stride 16 must be smaller than --window 16"]),
    ],
)
def test_bad_options_are_one_line_errors_before_the_model_loads(
    runner, tiny_gpt2, text_data, model_loads, flags, fragments
):
    result = invoke(runner, "evaluate", tiny_gpt2, "--dataset", text_data, *flags)
    assert_one_line_error(result, *fragments)
    assert model_loads == []


def test_python_callers_get_the_same_errors(tiny_gpt2, text_data):
    session = open_session(str(tiny_gpt2))
    with pytest.raises(LmflowError, match="did you mean 'lmflow'"):
        evaluate_dataset(session, str(text_data), nll_definition="lmfow")
    with pytest.raises(LmflowError, match="applies only to LMFlow's definition"):
        evaluate_dataset(session, str(text_data), prompt_structure="{input}")


def test_lmflows_definition_is_refused_on_conversations(runner, chat_model, tmp_path):
    data = write_json(tmp_path / "c.json", {"type": "conversation", "instances": conversations(3)})
    result = invoke(
        runner,
        "evaluate",
        chat_model,
        "--dataset",
        data,
        "--nll-definition",
        "lmflow",
        "--output",
        tmp_path / "r",
    )
    assert_one_line_error(result, "defined for text_only and text2text data", "--nll-definition training")


def test_lmflows_window_beyond_the_context_is_refused_where_a_text_needs_it(runner, tiny_llama, tmp_path):
    # Llama configs have no n_positions: LMFlow's window is min(1024, model_max_length = 512), over 256 here.
    data = write_json(tmp_path / "t.json", {"type": "text_only", "instances": [{"text": long_text(270)}]})
    args = [
        "evaluate",
        tiny_llama,
        "--dataset",
        data,
        "--nll-definition",
        "lmflow",
        "--output",
        tmp_path / "r",
    ]
    assert_one_line_error(invoke(runner, *args), "windows of 512 tokens", "context of 256", "--window 256")
    ok = invoke(runner, *args, "--window", 256)
    assert ok.exit_code == 0, ok.output
