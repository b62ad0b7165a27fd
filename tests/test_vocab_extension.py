"""The vocab_extension plugin: ``lmflow vocab extend`` on the real LLaMA-2 tokenizer and on byte-level BPE
tokenizers (old ids kept, every text decoding as before, the corpus encoding shorter), and runs that resize the
embeddings, initialise the new rows from their pieces and train only them; every user error is one line."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from helpers import (
    SHARED,
    assert_one_line_error,
    invoke,
    plugin_commands,
    save_tiny_model,
    tiny_model,
    write_json,
)
from lmflow_plugins import vocab_extension
from lmflow_plugins.vocab_extension import (
    extend_vocabulary,
    load_tokenizer_dir,
    old_pieces,
    resize_and_initialise,
)
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmflow_core import run
from lmflow_core.demo import demo_model_dir

LLAMA2_MODEL = SHARED / "llama2_tokenizer" / "tokenizer.model"
# Llama-3's pre-tokenizer pattern: a byte-level BPE of the Llama-3 / Qwen kind.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)


def python_docs() -> list[str]:
    """Python's own documentation topics (shipped with CPython as pydoc_data): a real English corpus."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """About 150k characters of the Python documentation."""
    path = tmp_path_factory.mktemp("corpus") / "python-docs.txt"
    path.write_text("\n".join(python_docs()[:40])[:150_000], encoding="utf-8")
    return path


def probe_texts(corpus: Path) -> list[str]:
    """Corpus lines, whitespace, unicode of many scripts, emoji sequences and random code points."""
    lines = [line for line in corpus.read_text(encoding="utf-8").splitlines() if line.strip()][:400]
    fixed = [
        "",
        " ",
        "  double  spaces  and trailing   ",
        "   leading spaces",
        "\ttabs\tand\nnew\r\nlines\n\n",
        "naïve café façade Ørsted straße",
        "東京都の日本語テキスト、中文文本。",
        "Привет, мир! Ελληνικά κείμενα. עברית. العربية",
        "😀 🏳️‍🌈 👨‍👩‍👧 ✅",
        "Ω≈ç√∫˜µ≤≥÷ ∀x∈ℝ",
        "\u00a0non-breaking\u2009thin\u200bzero-width",
        "ÿ\x01\x7f control characters",
        "mixed123numbers4567 and 3.14159",
        "def f(x):\n    return x ** 2  # squared\n",
        "a" * 300,
        "__init__ self.__dict__ **kwargs",
    ]
    rng = random.Random(0)
    ranges = [
        (0x20, 0x7E),
        (0xA0, 0x24F),
        (0x370, 0x3FF),
        (0x400, 0x4FF),
        (0x4E00, 0x4FFF),
        (0x1F300, 0x1F64F),
    ]
    noise = [
        "".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(rng.randint(1, 40))) for _ in range(200)
    ]
    return lines + fixed + noise


@pytest.fixture
def vocab_cli():
    """``lmflow vocab`` on the CLI object that the ``invoke`` helper runs."""
    yield from plugin_commands(vocab_extension, "vocab")


def assert_extension_invariants(base, extended, texts: list[str]) -> None:
    """Old tokens keep their ids; every text encodes to ids that decode exactly as the base's did."""
    new_vocab = extended.get_vocab()
    base_vocab = base.get_vocab()
    assert all(new_vocab[token] == i for token, i in base_vocab.items())
    assert sorted(new_vocab.values()) == list(range(len(extended)))
    old = base(texts, add_special_tokens=False)["input_ids"]
    new = extended(texts, add_special_tokens=False)["input_ids"]
    for text, a, b in zip(texts, old, new):
        assert extended.decode(b) == base.decode(a), text
    assert sum(map(len, new)) < sum(map(len, old))


# --------------------------------------------------------------------------------------------------------------
# SentencePiece: the real LLaMA-2 tokenizer
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama2_base(tmp_path_factory) -> Path:
    if not LLAMA2_MODEL.is_file():
        pytest.skip(f"the LLaMA-2 reference tokenizer is not at {LLAMA2_MODEL}")
    return LLAMA2_MODEL


@pytest.fixture(scope="module")
def llama2_extended(llama2_base, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("llama2-ext") / "tokenizer"
    return out, extend_vocabulary([corpus], str(llama2_base), 3000, out)


def test_llama2_extension_appends_pieces_and_keeps_everything_else(
    llama2_base, llama2_extended, corpus, tmp_path
):
    import sentencepiece as spm

    out, report = llama2_extended
    assert sorted(p.name for p in out.iterdir()) == [
        "lmflow_output.json",
        "tokenizer.json",
        "tokenizer.model",
        "tokenizer_config.json",
        "vocab_extension.json",
    ]
    base_sp = spm.SentencePieceProcessor(model_file=str(llama2_base))
    new_sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    assert new_sp.get_piece_size() == 32000 + report.added and report.added > 300
    assert [new_sp.id_to_piece(i) for i in range(32000)] == [base_sp.id_to_piece(i) for i in range(32000)]
    assert [new_sp.get_score(i) for i in range(32000)] == [base_sp.get_score(i) for i in range(32000)]

    (tmp_path / "base").mkdir()
    shutil.copyfile(llama2_base, tmp_path / "base" / "tokenizer.model")
    base = load_tokenizer_dir(tmp_path / "base", "base")
    extended = AutoTokenizer.from_pretrained(out)
    texts = probe_texts(corpus)
    assert_extension_invariants(base, extended, texts)
    for text in texts:  # the SentencePiece model itself round-trips as the base does
        assert new_sp.decode(new_sp.encode(text)) == base_sp.decode(base_sp.encode(text)), text
    # transformers' tokenizer.json encodes as the SentencePiece model does wherever the base's conversion did
    agree = [t for t in texts if base(t, add_special_tokens=False)["input_ids"] == base_sp.encode(t)]
    assert len(agree) > len(texts) // 2
    for text in agree:
        assert extended(text, add_special_tokens=False)["input_ids"] == new_sp.encode(text), text
    # the corpus uses the new pieces, and BOS is still added as LLaMA does
    assert max(extended(corpus.read_text()[:2000])["input_ids"]) >= 32000
    assert extended("Hello")["input_ids"][0] == extended.bos_token_id == 1


def test_the_report_gives_pieces_added_and_the_compression_on_the_corpus(
    llama2_base, llama2_extended, corpus
):
    out, report = llama2_extended
    stored = json.loads((out / "vocab_extension.json").read_text())
    assert stored["added"] == report.added == report.vocab_size - report.base_vocab_size
    assert stored["trained_pieces"] == 3000 and stored["base_vocab_size"] == 32000
    assert stored["kind"] == "sentencepiece" and stored["corpus_files"] == [str(corpus)]
    lines = [line for line in corpus.read_text(encoding="utf-8").splitlines() if line.strip()]
    characters = sum(map(len, lines))
    assert stored["corpus_characters"] == characters
    extended = AutoTokenizer.from_pretrained(out)
    after = sum(map(len, extended(lines, add_special_tokens=False)["input_ids"]))
    assert stored["tokens_after"] == after
    assert stored["tokens_per_character_after"] == pytest.approx(after / characters, abs=1e-6)
    assert stored["tokens_per_character_after"] < stored["tokens_per_character_before"]
    assert 0.03 < stored["token_reduction"] < 0.5


def test_a_transformers_llama2_directory_keeps_its_added_tokens_and_bos(llama2_base, corpus, tmp_path):
    (tmp_path / "bare").mkdir()
    shutil.copyfile(llama2_base, tmp_path / "bare" / "tokenizer.model")
    base = load_tokenizer_dir(tmp_path / "bare", "base")
    base.add_special_tokens({"pad_token": "<pad>"})  # id 32000, after the SentencePiece pieces
    base.save_pretrained(tmp_path / "base")
    shutil.copyfile(llama2_base, tmp_path / "base" / "tokenizer.model")  # as model repositories ship it
    base = AutoTokenizer.from_pretrained(tmp_path / "base")
    report = extend_vocabulary([corpus], str(tmp_path / "base"), 3000, tmp_path / "ext")
    extended = AutoTokenizer.from_pretrained(tmp_path / "ext")
    assert extended.pad_token_id == base.pad_token_id == 32000
    assert len(extended) == 32001 + report.added
    assert extended("a <pad> b")["input_ids"] == base("a <pad> b")["input_ids"] == [1, 263, 29871, 32000, 289]
    assert_extension_invariants(base, extended, probe_texts(corpus)[::4])


# --------------------------------------------------------------------------------------------------------------
# Byte-level BPE: GPT-2 style (the demo tokenizer) and Llama-3 style
# --------------------------------------------------------------------------------------------------------------


def llama3_style_tokenizer(directory: Path, texts: list[str]) -> Path:
    """A byte-level BPE with Llama-3's pre-tokenizer and ignore_merges, trained on ``texts``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>"
    )
    wrapped.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def byte_level_bases(tmp_path_factory) -> dict[str, Path]:
    other_text = python_docs()[60:]  # other topics than the corpus
    return {
        "gpt2-style demo": demo_model_dir(),
        "llama3-style": llama3_style_tokenizer(tmp_path_factory.mktemp("llama3-style"), other_text),
    }


@pytest.mark.parametrize("kind", ["gpt2-style demo", "llama3-style"])
def test_byte_level_extension_adds_merges_that_keep_ids_and_decoding(
    byte_level_bases, corpus, tmp_path, kind
):
    base_dir = byte_level_bases[kind]
    out = tmp_path / "ext"
    report = extend_vocabulary([corpus], str(base_dir), 1500, out)
    base = AutoTokenizer.from_pretrained(base_dir)
    extended = AutoTokenizer.from_pretrained(out)
    assert report.kind == "byte-level BPE" and report.added > 300
    assert len(extended) == len(base) + report.added
    assert_extension_invariants(base, extended, probe_texts(corpus))

    spec = json.loads((out / "tokenizer.json").read_text())
    base_spec = json.loads((base_dir / "tokenizer.json").read_text())
    # Ordinary BPE tokens made by appended merges, not "added tokens" cut out of the text before pre-tokenizing.
    assert spec["added_tokens"] == base_spec["added_tokens"]
    assert spec["model"]["merges"][: len(base_spec["model"]["merges"])] == base_spec["model"]["merges"]
    assert len(spec["model"]["merges"]) == len(base_spec["model"]["merges"]) + report.added
    new_tokens = [t for t, i in spec["model"]["vocab"].items() if i >= len(base)]
    assert len(new_tokens) == report.added
    # A new token is what the extended tokenizer makes of its own text, and nothing inside another pre-token.
    for token in new_tokens[:200]:
        text = extended.convert_tokens_to_string([token])
        assert extended.convert_ids_to_tokens(extended(text, add_special_tokens=False)["input_ids"]) == [
            token
        ]


# --------------------------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------------------------


def test_vocab_extend_prints_the_report_and_refuses_to_overwrite_without_the_flag(
    vocab_cli, runner, corpus, tmp_path
):
    out = tmp_path / "tok"
    args = [
        "vocab",
        "extend",
        "--corpus",
        corpus,
        "--base",
        demo_model_dir(),
        "--vocab-size",
        1200,
        "--output",
        out,
    ]
    result = invoke(runner, *args)
    assert result.exit_code == 0, result.output + result.stderr
    report = json.loads((out / "vocab_extension.json").read_text())
    assert f"{report['added']:,} pieces added, vocabulary 911 -> {report['vocab_size']:,}" in result.output
    assert f"{report['tokens_per_character_before']:.4f} tokens per character before" in result.output
    assert f"{report['tokens_per_character_after']:.4f} after" in result.output

    again = invoke(runner, *args[:-2], "--output", out, "--vocab-size", 1000)
    assert_one_line_error(again, f"--output {out} already exists and is not empty", "--overwrite")
    (out / "mine.txt").write_text("a user's file")
    refused = invoke(runner, *args, "--vocab-size", 1000, "--overwrite")
    assert_one_line_error(refused, "holds files lmflow did not write (mine.txt)", "nothing was deleted")
    (out / "mine.txt").unlink()
    assert json.loads((out / "vocab_extension.json").read_text()) == report
    replaced = invoke(runner, *args, "--vocab-size", 1000, "--overwrite")
    assert replaced.exit_code == 0, replaced.stderr
    assert json.loads((out / "vocab_extension.json").read_text())["trained_pieces"] == 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]  # no staging or replaced directory left


def test_vocab_extend_is_registered_through_the_entry_point():
    from lmflow_core import cli as cli_module

    before = set(cli_module.cli.commands)
    cli_module._register_plugin_commands()
    try:
        assert "extend" in cli_module.cli.commands["vocab"].commands
    finally:
        for name in set(cli_module.cli.commands) - before:
            cli_module.cli.commands.pop(name)


def _write_corpus(tmp_path: Path, case: str) -> Path:
    path = tmp_path / f"{case}.txt"
    if case == "empty":
        path.write_text("\n  \n\n", encoding="utf-8")
    elif case == "binary":
        path.write_bytes(bytes(range(256)) * 4)
    elif case == "nul":
        path.write_bytes(b"text\x00with\x00nul bytes\n")
    else:
        path.write_text("the cat sat on the mat\na dog ran far away\n" * 5, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "case, fragments",
    [
        ("empty", ["holds no text", "Pass files with the text"]),
        ("binary", ["is not UTF-8 text", "Re-encode the file as UTF-8"]),
        ("nul", ["is binary, not text"]),
        ("missing", ["--corpus", "does not exist"]),
        (
            "too-many-pieces",
            ["--vocab-size 5000 is more than the corpus supports", "Use --vocab-size 63 or less"],
        ),
        (
            "too-few-pieces",
            ["is smaller than the corpus's alphabet (19 characters)", "Use --vocab-size 22 or more"],
        ),
        ("no-base", ["--base", "is not a local path and could not be fetched"]),
        ("wordpiece-base", ["is a WordPiece tokenizer.json", "vocabulary extension does not handle"]),
        ("output-file", ["is a file"]),
    ],
)
def test_vocab_extend_user_errors_are_one_line_and_write_nothing(
    vocab_cli, runner, tmp_path, case, fragments
):
    corpus = _write_corpus(tmp_path, case if case in ("empty", "binary", "nul") else "small")
    if case == "missing":
        corpus = tmp_path / "no-such.txt"
    base: Path | str = demo_model_dir()
    if case == "no-base":
        base = "someone/unreachable-tokenizer"
    if case == "wordpiece-base":
        from tokenizers import Tokenizer, models

        base = tmp_path / "wordpiece"
        base.mkdir()
        Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]")).save(
            str(base / "tokenizer.json")
        )
    size = {"too-many-pieces": 5000, "too-few-pieces": 5}.get(case, 40)
    out = tmp_path / "out"
    if case == "output-file":
        out.write_text("not a directory")
    before = sorted(p.name for p in tmp_path.iterdir())
    result = invoke(
        runner, "vocab", "extend", "--corpus", corpus, "--base", base, "--vocab-size", size, "--output", out
    )
    assert_one_line_error(result, *fragments)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# --------------------------------------------------------------------------------------------------------------
# Runs with the extended tokenizer
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_extended(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo-ext") / "tokenizer"
    extend_vocabulary([corpus], str(demo_model_dir()), 1200, out)
    return out


@pytest.fixture(scope="module")
def untied_llama(tmp_path_factory) -> Path:
    """A tiny Llama with the demo tokenizer and a separate LM head."""
    return save_tiny_model("llama", tmp_path_factory.mktemp("untied-llama"), tie_word_embeddings=False)


@pytest.fixture
def docs_data(tmp_path, corpus) -> Path:
    lines = [line for line in corpus.read_text(encoding="utf-8").splitlines() if len(line) > 40][:64]
    return write_json(
        tmp_path / "docs.json", {"type": "text_only", "instances": [{"text": t} for t in lines]}
    )


def test_new_rows_start_as_the_mean_of_their_pieces_rows(untied_llama, demo_extended):
    model = AutoModelForCausalLM.from_pretrained(untied_llama)
    before_in = model.get_input_embeddings().weight.detach().clone()
    before_out = model.get_output_embeddings().weight.detach().clone()
    base = AutoTokenizer.from_pretrained(untied_llama)
    extended = AutoTokenizer.from_pretrained(demo_extended)
    assert resize_and_initialise(model, base, extended) == 0
    rows_in = model.get_input_embeddings().weight
    rows_out = model.get_output_embeddings().weight
    assert rows_in.shape[0] == rows_out.shape[0] == len(extended) == model.config.vocab_size
    assert torch.equal(rows_in[: len(base)], before_in) and torch.equal(rows_out[: len(base)], before_out)
    checked = 0
    for token_id in range(len(base), len(extended)):
        token = extended.convert_ids_to_tokens(token_id)
        if not token.startswith("Ġ"):
            continue
        # independently: the base tokenizer's encoding of the token's text (a word with its leading space)
        pieces = base(extended.convert_tokens_to_string([token]), add_special_tokens=False)["input_ids"]
        assert old_pieces(base, extended, token_id) == pieces
        assert torch.allclose(rows_in[token_id], before_in[pieces].mean(dim=0))
        assert torch.allclose(rows_out[token_id], before_out[pieces].mean(dim=0))
        checked += 1
    assert checked > 100


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_train_new_embeddings_only_changes_only_the_new_rows(
    untied_llama, demo_extended, docs_data, tmp_path, weight_decay
):
    out = tmp_path / "out"
    result = run(
        model=str(untied_llama),
        tokenizer=str(demo_extended),
        dataset=str(docs_data),
        output_dir=str(out),
        plugins=["vocab_extension"],
        vocab_extension={"train_new_embeddings_only": True},
        block_size=64,
        max_steps=3,
        batch_size=4,
        learning_rate=1e-2,
        weight_decay=weight_decay,
    )
    assert result.global_step == 3
    base = AutoTokenizer.from_pretrained(untied_llama)
    extended = AutoTokenizer.from_pretrained(demo_extended)
    initial = AutoModelForCausalLM.from_pretrained(untied_llama)
    resize_and_initialise(initial, base, extended)
    expected = initial.state_dict()
    trained = load_file(out / "model.safetensors")
    first = len(base)
    for name, tensor in trained.items():
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(tensor[:first], expected[name][:first]), name
            assert not torch.allclose(tensor[first:], expected[name][first:]), name
        else:
            assert torch.equal(tensor, expected[name]), name


def test_a_run_with_the_extended_llama2_tokenizer_saves_a_model_and_tokenizer_that_load_together(
    runner, llama2_base, llama2_extended, docs_data, tmp_path
):
    model_dir = tmp_path / "llama2-tiny"
    (tmp_path / "base").mkdir()
    shutil.copyfile(llama2_base, tmp_path / "base" / "tokenizer.model")
    load_tokenizer_dir(tmp_path / "base", "base").save_pretrained(model_dir)
    tiny_model("llama", vocab_size=32000, bos_token_id=1, eos_token_id=2).save_pretrained(model_dir)
    extended_dir, report = llama2_extended
    out = tmp_path / "out"
    result = invoke(
        runner,
        "run",
        "--model",
        model_dir,
        "--tokenizer",
        extended_dir,
        "--dataset",
        docs_data,
        "--output-dir",
        out,
        "--plugins",
        "vocab_extension",
        "--block-size",
        64,
        "--max-steps",
        2,
        "--batch-size",
        4,
    )
    assert result.exit_code == 0, result.output + result.stderr
    assert (
        f"note: vocabulary extension: {report.added:,} new tokens; embeddings 32,000 -> {report.vocab_size:,}"
        in (result.output)
    )
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.vocab_size == len(tokenizer) == report.vocab_size
    texts = [record["text"] for record in json.loads(docs_data.read_text())["instances"]]
    text = next(t for t in texts if max(tokenizer(t)["input_ids"]) >= 32000)  # the data uses new pieces
    ids = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        assert model(**ids).logits.shape[-1] == len(tokenizer)


def test_without_the_plugin_the_core_names_it_as_the_fix(
    runner, tiny_llama, demo_extended, docs_data, tmp_path
):
    args = ["run", "--model", tiny_llama, "--tokenizer", demo_extended, "--dataset", docs_data]
    result = invoke(runner, *args, "--output-dir", tmp_path / "out", "--block-size", 64)
    assert_one_line_error(
        result, "but the model's embeddings have only 911 rows", "add --plugins vocab_extension"
    )


@pytest.mark.parametrize(
    "case, fragments",
    [
        ("no-tokenizer", ["the vocab_extension plugin needs --tokenizer DIR"]),
        ("not-an-extension", ["does not extend the model's tokenizer", "lmflow vocab extend --base"]),
        ("nothing-new", ["has no token beyond the model's own 911", "--train-new-embeddings-only"]),
        ("with-lora", ["vocab_extension", "lora"]),
        ("with-zero3", ["vocab_extension", "zero3", "partitions the embedding matrix"]),
        ("new-rows-with-lisa", ["--train-new-embeddings-only cannot be combined with --plugins lisa"]),
        ("new-rows-with-fsdp", ["--train-new-embeddings-only cannot be combined with --plugins fsdp"]),
    ],
)
def test_run_errors_are_one_line_before_any_model_loads(
    runner, tiny_llama, demo_extended, llama2_extended, docs_data, tmp_path, monkeypatch, case, fragments
):
    loads = []
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: loads.append(a))
    tokenizer = {"not-an-extension": llama2_extended[0], "nothing-new": tiny_llama}.get(case, demo_extended)
    args = ["run", "--model", tiny_llama, "--dataset", docs_data, "--output-dir", tmp_path / "out"]
    other = {
        "with-lora": "lora",
        "with-zero3": "zero3",
        "new-rows-with-lisa": "lisa",
        "new-rows-with-fsdp": "fsdp",
    }
    args += ["--plugins", ",".join(["vocab_extension", *([other[case]] if case in other else [])])]
    if case != "no-tokenizer":
        args += ["--tokenizer", tokenizer]
    if case == "nothing-new" or case.startswith("new-rows"):
        args += ["--train-new-embeddings-only"]
    assert_one_line_error(invoke(runner, *args), *fragments)
    assert loads == []
    assert not (tmp_path / "out").exists()
