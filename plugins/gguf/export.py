"""Writing a model as one GGUF file in the layout llama.cpp's own converter (``convert_hf_to_gguf.py``) produces.

* Architectures: ``llama`` and ``mistral`` (both llama.cpp's ``llama``), ``qwen2``.
* Q/K weights of the Llama family are permuted for llama.cpp's RoPE, which rotates adjacent pairs (x0, x1),
  (x2, x3)... where transformers rotates the halves (x0, x_{d/2})...; Qwen2 runs in llama.cpp's NEOX mode, which
  rotates halves as transformers does, so its weights are written as they are.
* Tied embeddings: only ``token_embd``; llama.cpp uses it as the output matrix too.
* Types: 1-D tensors and norms stay f32; the other tensors take ``outtype``, a quantized type only where a
  row's length is a multiple of its block size (else f16, as llama.cpp's converter falls back). With q4_0 the
  output matrix is q8_0, as llama.cpp's quantizer keeps it at higher precision.
* Names and quantizers: the ``gguf`` package's (``gguf.get_tensor_name_map``, ``gguf.quants.quantize``).
* RoPE scaling: ``linear`` and ``yarn`` as metadata keys; ``llama3`` as llama.cpp's ``rope_freqs`` tensor of
  per-frequency divisors.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmflow_core import (
    LmflowError,
    check_output_apart,
    load_model_config,
    load_pretrained,
    quiet_libraries,
)

from .vocab import gguf_vocab

OUTTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
# transformers model_type -> (gguf.MODEL_ARCH member, whether Q/K are permuted for llama.cpp's RoPE)
ARCHITECTURES = {"llama": ("LLAMA", True), "mistral": ("LLAMA", True), "qwen2": ("QWEN2", False)}
ROPE_TYPES = ("default", "linear", "yarn", "llama3")
SP_MODEL = "tokenizer.model"


@dataclass
class ExportReport:
    """What ``export_gguf`` wrote."""

    path: Path
    architecture: str
    outtype: str
    tensors: int
    bytes: int
    types: dict[str, int]  # GGML type name -> number of tensors of that type


def check_architecture(model_config: Any) -> tuple[str, bool]:
    """The GGUF architecture of a transformers config and whether its Q/K weights are permuted.

    Raises:
        LmflowError: an architecture or RoPE scaling this exporter does not write.
    """
    kind = getattr(model_config, "model_type", None)
    if kind not in ARCHITECTURES:
        raise LmflowError(
            f"cannot export a {kind} model to GGUF",
            f"supported architectures: {', '.join(ARCHITECTURES)}",
        )
    rope = rope_parameters(model_config)
    rope_type = rope.get("rope_type", "default")
    if rope_type not in ROPE_TYPES:
        raise LmflowError(
            f"cannot export {rope_type} RoPE scaling to GGUF",
            "supported: no scaling, linear, yarn or llama3 (lmflow run --plugins rope_scaling --rope-type ...)",
        )
    return ARCHITECTURES[kind]


def rope_parameters(model_config: Any) -> dict[str, Any]:
    """The model's RoPE parameters (``rope_parameters`` in transformers 5; ``rope_scaling`` + ``rope_theta``)."""
    rope = getattr(model_config, "rope_parameters", None)
    if isinstance(rope, dict) and rope:
        return dict(rope)
    rope = dict(getattr(model_config, "rope_scaling", None) or {})
    rope.setdefault("rope_theta", getattr(model_config, "rope_theta", 10000.0))
    if "type" in rope and "rope_type" not in rope:
        rope["rope_type"] = rope.pop("type")
    return rope


def permute_qk(weights: Any, n_head: int) -> Any:
    """llama.cpp's ``LlamaModel.permute``: within each head, rows (0..d/2, d/2..d) become interleaved pairs."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def export_gguf(
    model: str | os.PathLike,
    output: str | os.PathLike,
    *,
    outtype: str = "f16",
    overwrite: bool = False,
    base: str | None = None,
    trust_remote_code: bool = False,
    plugins: list[str] | tuple[str, ...] = (),
    permute: bool = True,
) -> ExportReport:
    """Write ``model`` (a model directory, hub id or LoRA adapter directory) as a GGUF file for llama.cpp.

    A LoRA adapter is merged into its base first (peft's ``merge_and_unload``). The file is written next to
    ``output`` under a temporary name and renamed into place: ``output`` is the old file or the new one.

    Args:
        model: what to export; an adapter loads its base (``base`` overrides the one it names).
        output: the ``.gguf`` file to write; an existing file is refused unless ``overwrite``.
        outtype: ``f32``, ``f16``, ``bf16``, ``q8_0`` or ``q4_0`` (for 2-D weights; norms and 1-D stay f32).
        plugins: installed plugins whose loading hooks load the model, as for ``lmflow generate``.
        permute: permute Llama-family Q/K for llama.cpp's RoPE; only tests turn it off.

    Raises:
        LmflowError: an unsupported architecture, RoPE scaling, tokenizer or outtype; a missing model or
            tokenizer; an occupied output without ``overwrite``.
    """
    if outtype not in OUTTYPES:
        raise LmflowError(f"--outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    import_gguf()
    output_path = Path(output).expanduser()
    check_output_path(output_path, overwrite)
    check_output_apart(output_path, [model] + ([base] if base else []))
    model_config = load_model_config(
        base or str(model), trust_remote_code, option="--base" if base else "MODEL"
    )
    check_architecture(model_config)

    quiet_libraries()
    loaded = load_pretrained(
        str(model),
        base=base,
        plugins=list(plugins),
        device="cpu",
        dtype="auto",  # the stored dtype: each tensor is converted to float32 only while it is written
        trust_remote_code=trust_remote_code,
    )
    network = loaded.model
    if hasattr(network, "merge_and_unload"):
        network = network.merge_and_unload()
    return write_gguf(
        network,
        loaded.tokenizer,
        output_path,
        outtype=outtype,
        name=Path(str(model)).name,
        sp_model=find_sp_model(str(model), loaded.tokenizer),
        permute=permute,
    )


def import_gguf() -> Any:
    """The ``gguf`` package, or a one-line error saying how to install it."""
    try:
        import gguf
    except ImportError as exc:
        raise LmflowError(
            "exporting to GGUF needs the gguf package, which is not installed",
            "install it with `pip install gguf` (or lmflow's extra: pip install -e .[gguf])",
        ) from exc
    return gguf


def check_output_path(output: Path, overwrite: bool) -> None:
    """Refuse a directory, and an existing file unless ``overwrite``."""
    if output.is_dir():
        raise LmflowError(f"--output {output} is a directory", "give the path of the .gguf file to write")
    if output.exists() and not overwrite:
        raise LmflowError(
            f"--output {output} already exists", "pass --overwrite to replace it, or choose another"
        )


def find_sp_model(model: str, tokenizer: Any) -> Path | None:
    """A SentencePiece ``tokenizer.model`` beside the tokenizer or in the model directory, if there is one."""
    for candidate in (getattr(tokenizer, "vocab_file", None), Path(model) / SP_MODEL):
        if candidate and Path(candidate).is_file() and Path(candidate).name == SP_MODEL:
            return Path(candidate)
    return None


def write_gguf(
    model: Any,
    tokenizer: Any,
    output: str | os.PathLike,
    *,
    outtype: str = "f16",
    name: str | None = None,
    sp_model: str | os.PathLike | None = None,
    permute: bool = True,
) -> ExportReport:
    """Write a loaded transformers causal LM and its tokenizer as a GGUF file (atomically, replacing ``output``).

    The caller decides whether ``output`` may be replaced; see :func:`export_gguf`.
    """
    gguf = import_gguf()
    if outtype not in OUTTYPES:
        raise LmflowError(f"--outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    if tokenizer is None:
        raise LmflowError("the model has no tokenizer, which a GGUF file carries", "save it with the model")
    config = model.config
    arch_member, permutes = check_architecture(config)
    arch = gguf.MODEL_ARCH[arch_member]
    n_vocab = model.get_input_embeddings().weight.shape[0]
    fallback_ids = {kind: getattr(config, f"{kind}_token_id", None) for kind in ("bos", "eos", "pad")}
    vocab = gguf_vocab(tokenizer, n_vocab, sp_model, fallback_ids)

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
    os.close(handle)
    writer = gguf.GGUFWriter(temp, gguf.MODEL_ARCH_NAMES[arch])
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name or getattr(config, "_name_or_path", "") or "model")
        _add_hyperparameters(writer, config, arch_member, gguf)
        writer.add_file_type(_FILE_TYPES[outtype](gguf))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        vocab.add_to(writer)
        types: dict[str, int] = {}
        for tensor_name, data, qtype in _tensors(model, config, arch, outtype, permutes and permute, gguf):
            writer.add_tensor(tensor_name, data, raw_dtype=qtype)
            types[qtype.name] = types.get(qtype.name, 0) + 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(temp, output)
    finally:
        writer.close()
        if os.path.exists(temp):
            os.unlink(temp)
    return ExportReport(
        output, gguf.MODEL_ARCH_NAMES[arch], outtype, sum(types.values()), output.stat().st_size, types
    )


_FILE_TYPES = {
    "f32": lambda g: g.LlamaFileType.ALL_F32,
    "f16": lambda g: g.LlamaFileType.MOSTLY_F16,
    "bf16": lambda g: g.LlamaFileType.MOSTLY_BF16,
    "q8_0": lambda g: g.LlamaFileType.MOSTLY_Q8_0,
    "q4_0": lambda g: g.LlamaFileType.MOSTLY_Q4_0,
}


def _add_hyperparameters(writer: Any, config: Any, arch_member: str, gguf: Any) -> None:
    n_head = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or n_head)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if head_dim != config.hidden_size // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch_member == "LLAMA":
        writer.add_rope_dimension_count(head_dim)
    rope = rope_parameters(config)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", "default")
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif rope_type == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        original = rope.get("original_max_position_embeddings") or getattr(
            config, "original_max_position_embeddings", None
        )
        if original:
            writer.add_rope_scaling_orig_ctx_len(int(original))
        for key, add in (
            ("attention_factor", writer.add_rope_scaling_yarn_attn_factor),
            ("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
            ("beta_slow", writer.add_rope_scaling_yarn_beta_slow),
        ):
            if rope.get(key) is not None:
                add(float(rope[key]))


def _tensors(model: Any, config: Any, arch: Any, outtype: str, permute: bool, gguf: Any):
    """``(gguf name, data, GGMLQuantizationType)`` for each tensor, one at a time."""
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    n_head = config.num_attention_heads
    n_kv_head = getattr(config, "num_key_value_heads", None) or n_head
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == embedding.data_ptr()
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name.endswith("lm_head.weight"):
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise LmflowError(
                f"the tensor {hf_name} has no GGUF name for {gguf.MODEL_ARCH_NAMES[arch]}",
                "export a model of a supported architecture as transformers saves it",
            )
        data = tensor.detach().to("cpu").float().numpy()
        if permute and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            data = permute_qk(data, n_head)
        elif permute and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            data = permute_qk(data, n_kv_head)
        output_matrix = name == "output.weight" or (tied and name == "token_embd.weight")
        qtype = tensor_type(name, data.shape, outtype, gguf, output_matrix)
        yield name, gguf.quants.quantize(data, qtype), qtype
    if rope_parameters(config).get("rope_type") == "llama3":
        name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        yield name, rope_frequency_factors(config), gguf.GGMLQuantizationType.F32


def rope_frequency_factors(config: Any) -> Any:
    """llama.cpp's ``rope_freqs`` for llama3 scaling: each frequency's divisor, unscaled / scaled, as
    transformers computes the scaled frequencies (llama.cpp divides the rotation angle by it)."""
    import numpy as np
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    base = float(rope_parameters(config).get("rope_theta", 10000.0))
    unscaled = 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    return (unscaled / scaled.double().numpy()).astype(np.float32)


def tensor_type(
    name: str, shape: tuple[int, ...], outtype: str, gguf: Any, output_matrix: bool = False
) -> Any:
    """The GGML type a tensor is stored in for ``outtype`` (the rules of llama.cpp's converter and quantizer).

    ``output_matrix``: the tensor that computes the logits (``output.weight``, or ``token_embd.weight`` when the
    embeddings are tied). For q4_0 it is stored as q8_0: llama.cpp's quantizer keeps it at higher precision
    (Q6_K, which the ``gguf`` package cannot write, or Q8_0 where Q6_K's block does not fit).
    """
    kinds = gguf.GGMLQuantizationType
    if len(shape) <= 1 or name.endswith("_norm.weight") or outtype == "f32":
        return kinds.F32
    if outtype == "q4_0" and output_matrix:
        outtype = "q8_0"
    wanted = {"f16": kinds.F16, "bf16": kinds.BF16, "q8_0": kinds.Q8_0, "q4_0": kinds.Q4_0}[outtype]
    block = gguf.GGML_QUANT_SIZES[wanted][0]
    if shape[-1] % block:
        return kinds.F16
    return wanted
