"""The gguf plugin: `lmflow export gguf` writes files whose weights, read back with gguf.GGUFReader and run by a
NumPy forward pass that follows llama.cpp's conventions, give transformers' logits; metadata, tokenizers, LoRA
adapters, RoPE scaling and bad input."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import SHARED, assert_one_line_error, invoke, plugin_commands, save_tiny_model, tiny_model

gguf = pytest.importorskip("gguf")

import lmflow_plugins.gguf as gguf_plugin  # noqa: E402
from lmflow_plugins.gguf import export_gguf, permute_qk  # noqa: E402

from lmflow_core import LmflowError  # noqa: E402

LLAMA2_MODEL = SHARED / "llama2_tokenizer" / "tokenizer.model"
IDS = np.random.default_rng(0).integers(3, 900, 32).tolist()
QWEN2_SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 80,  # not a multiple of 32: ffn_down rows fall back to f16 when quantized
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "tie_word_embeddings": True,
    "initializer_range": 0.1,
}
MISTRAL_SHAPE = {**QWEN2_SHAPE, "intermediate_size": 64, "tie_word_embeddings": False, "sliding_window": None}
# Against transformers' fp32 logits (which reach |2-4| for these models), per outtype: the largest |difference|
# allowed, the least correlation of all logits, and the least share of positions with the same greedy token.
TOLERANCE = {"f32": 1e-4, "f16": 1e-2, "bf16": 5e-2, "q8_0": 1.5e-1, "q4_0": 1.5}
CORRELATION = {"f32": 0.9999, "f16": 0.9999, "bf16": 0.999, "q8_0": 0.999, "q4_0": 0.95}
SAME_ARGMAX = {"f32": 1.0, "f16": 1.0, "bf16": 0.85, "q8_0": 0.85, "q4_0": 0.5}


# --------------------------------------------------------------------------------------------------------------
# Reading a GGUF file back and running it as llama.cpp does
# --------------------------------------------------------------------------------------------------------------


def read_gguf(path: Path) -> tuple[dict, dict, dict]:
    """``(metadata, weights as float32 arrays in PyTorch's shape, GGML type name per tensor)``."""
    reader = gguf.GGUFReader(path)
    meta = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    weights, types = {}, {}
    for tensor in reader.tensors:
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        weights[tensor.name] = np.asarray(data, dtype=np.float32).reshape(
            tuple(reversed(tensor.shape.tolist()))
        )
        types[tensor.name] = tensor.tensor_type.name
    return meta, weights, types


def rms_norm(x, weight, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def rope(x, positions, base, freq_scale, neox, divisors=1.0):
    """llama.cpp's ggml_rope: NORM mode rotates adjacent pairs (x0, x1), (x2, x3)...; NEOX mode rotates
    (x_i, x_{i + d/2}); ``divisors``: the per-frequency factors of a ``rope_freqs`` tensor."""
    d = x.shape[-1]
    theta = positions[:, None] * freq_scale * base ** (-np.arange(0, d, 2) / d) / divisors  # (T, d/2)
    cos, sin = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
    if neox:
        a, b = x[..., : d // 2], x[..., d // 2 :]
        return np.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
    return out


def gguf_forward(path: Path, ids: list[int], neox: bool | None = None) -> np.ndarray:
    """Logits of ``ids`` computed from the file alone: RMSNorm, RoPE (llama: NORM mode, qwen2: NEOX mode), GQA,
    causal attention, SwiGLU, Qwen2's q/k/v biases, tied or separate output matrix (float64)."""
    meta, w, _ = read_gguf(path)
    arch = meta["general.architecture"]
    key = lambda name: meta[f"{arch}.{name}"]  # noqa: E731
    w = {name: value.astype(np.float64) for name, value in w.items()}
    n_head, n_kv, eps = (
        key("attention.head_count"),
        key("attention.head_count_kv"),
        key("attention.layer_norm_rms_epsilon"),
    )
    base = key("rope.freq_base")
    scale = 1.0 / key("rope.scaling.factor") if meta.get(f"{arch}.rope.scaling.type") == "linear" else 1.0
    divisors = w.get("rope_freqs.weight", 1.0)
    neox = (arch == "qwen2") if neox is None else neox
    x = w["token_embd.weight"][ids]
    steps, positions = len(ids), np.arange(len(ids), dtype=np.float64)
    mask = np.triu(np.full((steps, steps), -np.inf), k=1)
    for layer in range(key("block_count")):
        p = f"blk.{layer}."
        h = rms_norm(x, w[p + "attn_norm.weight"], eps)
        q, k, v = (h @ w[p + f"attn_{n}.weight"].T + w.get(p + f"attn_{n}.bias", 0.0) for n in "qkv")
        head_dim = q.shape[-1] // n_head
        q = rope(q.reshape(steps, n_head, head_dim), positions, base, scale, neox, divisors)
        k = rope(k.reshape(steps, n_kv, head_dim), positions, base, scale, neox, divisors)
        v = v.reshape(steps, n_kv, head_dim)
        group = n_head // n_kv
        out = np.empty((steps, n_head, head_dim))
        for head in range(n_head):
            scores = q[:, head] @ k[:, head // group].T / np.sqrt(head_dim) + mask
            scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
            out[:, head] = (scores / scores.sum(axis=-1, keepdims=True)) @ v[:, head // group]
        x = x + out.reshape(steps, -1) @ w[p + "attn_output.weight"].T
        h = rms_norm(x, w[p + "ffn_norm.weight"], eps)
        gate = h @ w[p + "ffn_gate.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * (h @ w[p + "ffn_up.weight"].T)) @ w[p + "ffn_down.weight"].T
    x = rms_norm(x, w["output_norm.weight"], eps)
    return x @ w.get("output.weight", w["token_embd.weight"]).T


def hf_logits(model_dir: Path, ids: list[int]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


def compare(path: Path, expected: np.ndarray, **forward) -> tuple[float, float, float]:
    """``(max |difference|, correlation, share of positions with the same argmax)``."""
    got = gguf_forward(path, IDS, **forward)
    return (
        float(np.abs(got - expected).max()),
        float(np.corrcoef(got.ravel(), expected.ravel())[0, 1]),
        float((got.argmax(-1) == expected.argmax(-1)).mean()),
    )


def assert_close(path: Path, expected: np.ndarray, outtype: str, what: str) -> None:
    difference, correlation, same_argmax = compare(path, expected)
    print(
        f"{what} {outtype}: max |difference| {difference:.2e}, correlation {correlation:.5f}, same argmax {same_argmax:.2f}"
    )
    assert difference < TOLERANCE[outtype]
    assert correlation >= CORRELATION[outtype]
    assert same_argmax >= SAME_ARGMAX[outtype]


# --------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def export_command():
    """``lmflow export gguf`` on the CLI object the tests invoke."""
    yield from plugin_commands(gguf_plugin, "export")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    """A tiny Llama (untied head, GQA) with the demo's byte-level BPE tokenizer."""
    return save_tiny_model(
        "llama", tmp_path_factory.mktemp("llama"), seed=3, tie_word_embeddings=False, initializer_range=0.1
    )


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory) -> Path:
    """A tiny Qwen2 (q/k/v biases, tied embeddings) with the demo tokenizer; biases randomised so they matter."""
    import torch

    directory = save_tiny_model("qwen2", tmp_path_factory.mktemp("qwen2"), seed=4, **QWEN2_SHAPE)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory)
    torch.manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0, 0.5)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Export a model once per (directory, outtype) within the module."""
    cache: dict[tuple[str, str], Path] = {}
    folder = tmp_path_factory.mktemp("gguf")

    def export(model_dir: Path, outtype: str, **options) -> Path:
        key = (str(model_dir), outtype + repr(sorted(options.items())))
        if key not in cache:
            out = folder / f"{model_dir.name}-{outtype}-{len(cache)}.gguf"
            export_gguf(model_dir, out, outtype=outtype, **options)
            cache[key] = out
        return cache[key]

    return export


# --------------------------------------------------------------------------------------------------------------
# Logits
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("outtype", list(TOLERANCE))
def test_llama_logits_from_the_file_match_transformers(llama_dir, exported, outtype):
    assert_close(exported(llama_dir, outtype), hf_logits(llama_dir, IDS), outtype, "llama")


@pytest.mark.parametrize("outtype", ["f32", "q8_0", "q4_0"])
def test_qwen2_logits_from_the_file_match_transformers(qwen2_dir, exported, outtype):
    path = exported(qwen2_dir, outtype)
    assert_close(path, hf_logits(qwen2_dir, IDS), outtype, "qwen2")
    _, weights, types = read_gguf(path)
    assert "output.weight" not in weights  # tied: llama.cpp reads token_embd as the output matrix
    assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"} <= set(weights)
    if outtype != "f32":
        # A row of 80 is no multiple of the 32-value block: that matrix falls back to f16.
        assert types["blk.0.ffn_down.weight"] == "F16"
        assert types["blk.0.ffn_up.weight"] == outtype.upper()


def test_a_bf16_model_exported_as_bf16_loses_nothing(tmp_path, exported):
    import torch

    model_dir = save_tiny_model(
        "llama", tmp_path / "bf16", seed=3, initializer_range=0.1, dtype=torch.bfloat16
    )
    path = exported(model_dir, "bf16")
    assert read_gguf(path)[2]["blk.0.attn_q.weight"] == "BF16"
    assert compare(path, hf_logits(model_dir, IDS))[0] < TOLERANCE["f32"]


def test_mistral_exports_as_llama(tmp_path, exported):
    model_dir = save_tiny_model("mistral", tmp_path / "mistral", seed=6, **MISTRAL_SHAPE)
    path = exported(model_dir, "f32")
    assert read_gguf(path)[0]["general.architecture"] == "llama"
    assert compare(path, hf_logits(model_dir, IDS))[0] < 1e-4


def test_without_the_qk_permutation_the_llama_logits_do_not_match(llama_dir, exported):
    """Negative control: the comparison detects a file whose Q/K rows are in transformers' order."""
    expected = hf_logits(llama_dir, IDS)
    unpermuted = exported(llama_dir, "f32", permute=False)
    difference, _, same_argmax = compare(unpermuted, expected)
    print(f"unpermuted llama: max |difference| {difference:.2e}, same argmax {same_argmax:.2f}")
    assert difference > 1000 * TOLERANCE["f32"] and same_argmax < 1.0
    # ...and that file is exactly what NEOX-mode RoPE expects, which is why Qwen2 is written unpermuted.
    assert compare(unpermuted, expected, neox=True)[0] < 1e-4
    assert compare(exported(llama_dir, "f32"), expected, neox=True)[0] > 1000 * TOLERANCE["f32"]


def test_permute_qk_interleaves_the_halves_of_each_head():
    rows = np.arange(8)[:, None]  # 2 heads of dimension 4: rows 0 1 | 2 3 are the halves of head 0
    assert permute_qk(rows, 2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


# --------------------------------------------------------------------------------------------------------------
# Metadata and tensors
# --------------------------------------------------------------------------------------------------------------


def test_llama_metadata_and_tensors_follow_the_conventions(llama_dir, exported):
    from transformers import AutoConfig, AutoTokenizer

    meta, weights, types = read_gguf(exported(llama_dir, "q8_0"))
    config = AutoConfig.from_pretrained(llama_dir)
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    assert meta["general.architecture"] == "llama"
    assert meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    expected = {
        "llama.context_length": 256,
        "llama.embedding_length": 32,
        "llama.block_count": 2,
        "llama.feed_forward_length": 64,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.rope.dimension_count": 8,
        "llama.vocab_size": config.vocab_size,
    }
    assert {k: meta[k] for k in expected} == expected
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(config.rms_norm_eps)
    assert meta["llama.rope.freq_base"] == pytest.approx(10000.0)
    assert "llama.rope.scaling.type" not in meta

    assert meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.pre"] == "gpt-2"
    vocab = {i: t for t, i in tokenizer.get_vocab().items()}
    assert meta["tokenizer.ggml.tokens"] == [vocab[i] for i in range(config.vocab_size)]
    spec = json.loads((llama_dir / "tokenizer.json").read_text())
    assert meta["tokenizer.ggml.merges"] == [" ".join(m) for m in spec["model"]["merges"]]
    token_types = meta["tokenizer.ggml.token_type"]
    assert token_types[tokenizer.eos_token_id] == gguf.TokenType.CONTROL
    assert token_types[100] == gguf.TokenType.NORMAL
    assert meta["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert meta["tokenizer.ggml.padding_token_id"] == tokenizer.pad_token_id
    # The demo tokenizer names no BOS: the model config's is written, as llama.cpp's converter does.
    assert tokenizer.bos_token_id is None
    assert meta["tokenizer.ggml.bos_token_id"] == config.bos_token_id
    assert meta["tokenizer.ggml.add_bos_token"] is False

    block = {"attn_norm": [32], "attn_q": [32, 32], "attn_k": [16, 32], "attn_v": [16, 32]}
    block |= {"attn_output": [32, 32], "ffn_norm": [32], "ffn_gate": [64, 32], "ffn_up": [64, 32]}
    block |= {"ffn_down": [32, 64]}
    names = {"token_embd.weight": [config.vocab_size, 32], "output_norm.weight": [32]}
    names |= {"output.weight": [config.vocab_size, 32]}
    names |= {f"blk.{i}.{n}.weight": shape for i in range(2) for n, shape in block.items()}
    assert {name: list(w.shape) for name, w in weights.items()} == names
    assert {n: t for n, t in types.items() if t != "Q8_0"} == {
        n: "F32" for n in names if n.endswith("norm.weight")
    }


def test_rope_scaling_written_by_the_rope_scaling_plugin_is_exported(tmp_path, exported):
    from lmflow_plugins.rope_scaling import apply_rope_scaling
    from transformers import AutoConfig

    linear_dir = save_tiny_model("llama", tmp_path / "linear", seed=7)
    config = AutoConfig.from_pretrained(linear_dir)
    apply_rope_scaling(config, "linear", factor=4.0)
    config.save_pretrained(linear_dir)
    path = exported(linear_dir, "f32")
    meta = read_gguf(path)[0]
    assert meta["llama.rope.scaling.type"] == "linear"
    assert meta["llama.rope.scaling.factor"] == pytest.approx(4.0)
    assert meta["llama.context_length"] == 1024
    # Positions are divided by the factor: the forward pass with llama.cpp's freq_scale matches transformers.
    assert compare(path, hf_logits(linear_dir, IDS))[0] < 1e-4

    yarn_dir = save_tiny_model("llama", tmp_path / "yarn", seed=7)
    config = AutoConfig.from_pretrained(yarn_dir)
    apply_rope_scaling(config, "yarn", target_context=1024)
    config.save_pretrained(yarn_dir)
    meta = read_gguf(exported(yarn_dir, "f32"))[0]
    assert meta["llama.rope.scaling.type"] == "yarn"
    assert meta["llama.rope.scaling.factor"] == pytest.approx(4.0)
    assert meta["llama.rope.scaling.original_context_length"] == 256

    # llama3 scaling is a rope_freqs tensor of per-frequency divisors, which the forward pass applies.
    llama3_dir = save_tiny_model("llama", tmp_path / "llama3", seed=7, initializer_range=0.1)
    config = AutoConfig.from_pretrained(llama3_dir)
    apply_rope_scaling(config, "llama3", factor=4.0)
    config.save_pretrained(llama3_dir)
    path = exported(llama3_dir, "f32")
    meta, weights, _ = read_gguf(path)
    assert "llama.rope.scaling.type" not in meta
    assert weights["rope_freqs.weight"].tolist() == pytest.approx([1.0, 1.0, 4.0, 4.0])
    assert compare(path, hf_logits(llama3_dir, IDS))[0] < 1e-4
    plain_dir = save_tiny_model("llama", tmp_path / "plain", seed=7, initializer_range=0.1)
    assert compare(path, hf_logits(plain_dir, IDS))[0] > 1e-2  # the scaling changes the logits


# --------------------------------------------------------------------------------------------------------------
# SentencePiece tokenizers ("llama")
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama2_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny Llama with the real LLaMA-2 tokenizer: beside its tokenizer.model, and as transformers saves it
    (tokenizer.json only)."""
    if not LLAMA2_MODEL.is_file():
        pytest.skip("../shared/reference/llama2_tokenizer is not present")
    from transformers import AutoTokenizer

    with_model = tmp_path_factory.mktemp("llama2-sp")
    shutil.copyfile(LLAMA2_MODEL, with_model / "tokenizer.model")
    tokenizer = AutoTokenizer.from_pretrained(with_model, add_bos_token=True)
    tokenizer.save_pretrained(with_model)
    json_only = tmp_path_factory.mktemp("llama2-json")
    tokenizer.save_pretrained(json_only)
    assert not (json_only / "tokenizer.model").exists()
    model = tiny_model("llama", seed=8, vocab_size=32000, bos_token_id=1, eos_token_id=2)
    for directory in (with_model, json_only):
        model.save_pretrained(directory)
    return with_model, json_only


def test_a_sentencepiece_tokenizer_becomes_a_llama_vocabulary_with_scores_and_token_types(llama2_dirs):
    import sentencepiece
    from lmflow_plugins.gguf.vocab import gguf_vocab
    from transformers import AutoTokenizer

    with_model, json_only = llama2_dirs
    tokenizer = AutoTokenizer.from_pretrained(with_model)
    vocab = gguf_vocab(tokenizer, 32000, with_model / "tokenizer.model")
    processor = sentencepiece.SentencePieceProcessor(model_file=str(LLAMA2_MODEL))
    assert (vocab.model, vocab.pre) == ("llama", "default")
    assert vocab.tokens == [processor.id_to_piece(i) for i in range(32000)]
    assert np.array_equal(vocab.scores, [processor.get_score(i) for i in range(32000)])
    types = vocab.token_types
    assert types[0] == gguf.TokenType.UNKNOWN
    assert types[1] == types[2] == gguf.TokenType.CONTROL
    assert set(types[3:259]) == {gguf.TokenType.BYTE}
    assert set(types[259:]) == {gguf.TokenType.NORMAL}
    assert vocab.special_ids == {"bos": 1, "eos": 2, "unk": 0}
    assert (vocab.add_bos, vocab.add_eos) == (True, False)

    # Without tokenizer.model (as transformers saves it) the scores come from the merge ranks: the same tokens
    # and types, and every piece a merge makes ranks in the same order as by SentencePiece's own scores.
    rebuilt = gguf_vocab(AutoTokenizer.from_pretrained(json_only), 32000, json_only / "tokenizer.model")
    assert rebuilt.tokens == vocab.tokens
    assert rebuilt.token_types == types
    merged = [i for i in range(259, 32000) if len(processor.id_to_piece(i)) > 1]
    true_order = sorted(merged, key=lambda i: (-processor.get_score(i), i))
    assert sorted(merged, key=lambda i: (-rebuilt.scores[i], i)) == true_order
    # A larger embedding matrix gets padding tokens; a smaller one is refused.
    padded = gguf_vocab(tokenizer, 32003, with_model / "tokenizer.model")
    assert padded.tokens[32000:] == ["[PAD32000]", "[PAD32001]", "[PAD32002]"]
    assert padded.token_types[32000:] == [gguf.TokenType.UNUSED] * 3
    with pytest.raises(LmflowError, match="32,000 tokens but the model's embedding matrix has 31,999 rows"):
        gguf_vocab(tokenizer, 31999)


@pytest.mark.slow
def test_a_sentencepiece_model_round_trips_through_the_file(llama2_dirs, exported):
    """Reading 32,000 tokens back with GGUFReader takes about 10 s."""
    meta = read_gguf(exported(llama2_dirs[0], "q8_0"))[0]
    assert meta["tokenizer.ggml.model"] == "llama"
    assert meta["tokenizer.ggml.tokens"][:4] == ["<unk>", "<s>", "</s>", "<0x00>"]
    assert meta["tokenizer.ggml.scores"][260] == pytest.approx(-1.0)
    assert meta["tokenizer.ggml.token_type"][:4] == [2, 3, 3, 6]
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert meta["tokenizer.ggml.add_bos_token"] is True


@pytest.mark.slow
def test_a_vocabulary_grown_by_vocab_extend_is_exported_with_its_new_tokens_and_merges(tmp_path):
    """`lmflow vocab extend` takes about 10 s."""
    from pydoc_data.topics import topics

    from lmflow_plugins.gguf.vocab import gguf_vocab
    from lmflow_plugins.vocab_extension import extend_vocabulary
    from transformers import AutoTokenizer

    from lmflow_core.demo import demo_model_dir

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(topics[key] for key in sorted(topics))[:20_000], encoding="utf-8")
    report = extend_vocabulary([str(corpus)], str(demo_model_dir()), 400, tmp_path / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tokenizer")
    old = len(AutoTokenizer.from_pretrained(demo_model_dir()))
    assert report.added > 0 and len(tokenizer) == old + report.added
    vocab = gguf_vocab(tokenizer, len(tokenizer))
    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    assert vocab.tokens == [by_id[i] for i in range(len(tokenizer))]
    assert set(vocab.token_types[old:]) == {gguf.TokenType.NORMAL}
    spec = json.loads((tmp_path / "tokenizer" / "tokenizer.json").read_text())
    assert vocab.merges == [" ".join(m) for m in spec["model"]["merges"]]
    assert (vocab.model, vocab.pre) == ("gpt2", "gpt-2")


# --------------------------------------------------------------------------------------------------------------
# The command, LoRA adapters, a run
# --------------------------------------------------------------------------------------------------------------


def test_the_command_exports_a_trained_model_with_its_chat_template(runner, chat_model, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "model.gguf"
    result = invoke(runner, "export", "gguf", chat_model, "--output", out, "--outtype", "q8_0")
    assert result.exit_code == 0, result.output + result.stderr
    assert f"wrote {out}: llama, q8_0" in result.output
    meta = read_gguf(out)[0]
    template = AutoTokenizer.from_pretrained(chat_model).chat_template
    assert template and "<|im_start|>" in template
    assert meta["tokenizer.chat_template"] == template
    expected = hf_logits(chat_model, IDS)
    assert_close(out, expected, "q8_0", "lmflow-trained tiny llama")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]  # no temporary file left
    # 4-bit on weights of the usual initial scale (0.02, then trained): closer than the wider random ones above.
    four_bit = export_gguf(chat_model, tmp_path / "q4.gguf", outtype="q4_0").path
    assert_close(four_bit, expected, "q4_0", "lmflow-trained tiny llama")
    assert compare(four_bit, expected)[2] >= 0.9


def test_a_lora_adapter_is_merged_before_export(llama_dir, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(llama_dir)
    torch.manual_seed(9)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "down_proj"], init_lora_weights=False
    )
    adapter = get_peft_model(base, config)
    adapter.peft_config["default"].base_model_name_or_path = str(llama_dir)
    adapter.save_pretrained(tmp_path / "adapter")
    merged_dir = tmp_path / "merged"
    adapter.merge_and_unload().save_pretrained(merged_dir)
    expected = hf_logits(merged_dir, IDS)
    assert np.abs(expected - hf_logits(llama_dir, IDS)).max() > 1e-2  # the adapter changes the model

    path = export_gguf(tmp_path / "adapter", tmp_path / "adapter.gguf", outtype="f32").path
    assert compare(path, expected)[0] < 1e-4


def test_the_plugin_is_found_through_the_entry_point_group():
    from lmflow_core.plugins import discover_plugins

    info = discover_plugins()["gguf"]
    assert info.builtin and info.module == "lmflow_plugins.gguf"


@pytest.mark.slow
def test_the_installed_command_exports(llama_dir, tmp_path):
    """`lmflow export gguf` as a user runs it: the plugin's command found through its entry point."""
    import subprocess
    import sys

    out = tmp_path / "m.gguf"
    command = [
        sys.executable,
        "-m",
        "lmflow_core.cli",
        "export",
        "gguf",
        str(llama_dir),
        "--output",
        str(out),
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    assert result.returncode == 0, result.stderr
    assert read_gguf(out)[0]["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16


@pytest.mark.slow
def test_a_run_with_the_plugin_writes_model_gguf(runner, fast_run_args, tmp_path):
    result = invoke(runner, *fast_run_args, "--plugins", "gguf", "--gguf-outtype", "q4_0")
    assert result.exit_code == 0, result.output + result.stderr
    out = tmp_path / "out"
    assert "model.gguf (q4_0" in result.output
    meta = read_gguf(out / "model.gguf")[0]
    assert meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_0
    assert "<|im_start|>" in meta["tokenizer.chat_template"]


# --------------------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------------------


def test_an_unsupported_architecture_is_a_one_line_error_naming_the_supported_ones(
    runner, tiny_gpt2, tmp_path, model_loads
):
    result = invoke(runner, "export", "gguf", tiny_gpt2, "--output", tmp_path / "m.gguf")
    assert_one_line_error(result, "cannot export a gpt2 model to GGUF", "llama, mistral, qwen2")
    assert model_loads == [] and not (tmp_path / "m.gguf").exists()


def test_a_model_without_a_tokenizer_is_refused(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "bare")
    with pytest.raises(LmflowError, match="tokenizer"):
        export_gguf(tmp_path / "bare", tmp_path / "bare.gguf")
    assert [p.name for p in tmp_path.iterdir()] == ["bare"]


def test_an_occupied_output_is_refused_without_overwrite_and_replaced_with_it(runner, llama_dir, tmp_path):
    out = tmp_path / "model.gguf"
    out.write_text("someone's file")
    result = invoke(runner, "export", "gguf", llama_dir, "--output", out, "--outtype", "f32")
    assert_one_line_error(result, f"--output {out} already exists", "--overwrite")
    assert out.read_text() == "someone's file"
    result = invoke(runner, "export", "gguf", llama_dir, "--output", out, "--outtype", "f32", "--overwrite")
    assert result.exit_code == 0, result.output + result.stderr
    assert read_gguf(out)[0]["general.file_type"] == gguf.LlamaFileType.ALL_F32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]
    result = invoke(runner, "export", "gguf", llama_dir, "--output", tmp_path, "--overwrite")
    assert_one_line_error(result, "is a directory")


def test_a_failed_export_leaves_the_old_file_and_no_temporary_file(llama_dir, tmp_path, monkeypatch):
    out = tmp_path / "model.gguf"
    out.write_bytes(b"old")

    def broken(self):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", broken)
    with pytest.raises(OSError, match="disk full"):
        export_gguf(llama_dir, out, outtype="f32", overwrite=True)
    assert out.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]


def test_without_the_gguf_package_the_error_says_how_to_install_it(llama_dir, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "gguf", None)  # as if it were not installed
    with pytest.raises(LmflowError, match="pip install gguf"):
        export_gguf(llama_dir, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []
