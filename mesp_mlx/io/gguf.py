"""GGUF files (llama.cpp) into mlx-lm-named arrays and a Hugging Face style config.

GGML-quantized tensors are kept exactly (ggml_types.py: repacked into MLX's affine format where a group of 32
represents the blocks, else kept as packed blocks); plain float matrices follow the run's precision choice.
We read tensors one at a time, each from its offset in the file into memory of its own that is freed with it
(`tensor_bytes`), so a conversion never holds the whole model, nor the pages of the whole file, and every tensor the
header lists is accounted for (`mx.load` silently drops some types).

What differs between architectures (llama.cpp's name for each, tensor names, q/k permutation, norm storage, the
config fields a file records its own way) is each family's record (`models/<family>.py`, `FAMILY`); this module
reads those records and holds no family knowledge of its own; a family whose files need more than renaming names
its own io module in its record (Family.gguf_io: Qwen3.5's qwen35_gguf.py), which gives the store's config, the
tensors' names and their transforms.
"""
import importlib
from typing import NamedTuple

import numpy as np

import mlx.core as mx

from ..models import GGUF_ARCHITECTURES
from . import SourceError


class _Meta:
    """What a family's gguf_config reads: "<arch>.<key>" metadata, the tensor names, one tensor as numpy."""

    def __init__(self, reader, arch):
        self.reader, self.arch = reader, arch
        self.names = {t.name for t in reader.tensors}

    def get(self, key, default=None):
        return field(self.reader, f"{self.arch}.{key}", default)

    def array(self, name):
        return np.asarray(next(t for t in self.reader.tensors if t.name == name).data)


def _gguf():
    """The gguf package, imported on first use so importing this module never needs it."""
    try:
        import gguf
    except ImportError:
        raise SourceError("reading GGUF files needs the 'gguf' package: pip install gguf") from None
    return gguf


def open_gguf(path):
    gguf = _gguf()
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:
        raise SourceError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    v = f.contents()
    return v


def file_family(reader, path):
    """The family record of a GGUF file's general.architecture."""
    arch = field(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise SourceError(f"{path}: GGUF architecture {arch!r} is not supported (supported: "
                          f"{', '.join(GGUF_ARCHITECTURES)})")
    return GGUF_ARCHITECTURES[arch]


def family_io(family):
    """The io module that reads this family's files (Family.gguf_io), or None for the generic reading here."""
    return importlib.import_module(f"{__package__}.{family.gguf_io}") if family.gguf_io else None


def hf_name(gguf_name, family):
    parts = gguf_name.split(".")
    names = family.gguf_to_hf()
    if parts[0] == "blk":
        return f"model.layers.{parts[1]}.{names.get(parts[2], parts[2])}.{parts[3]}"
    return f"{names.get(parts[0], parts[0])}.{parts[1]}"


def norm_shift(reader, path=None):
    """What llama.cpp added to the norm weights of this file's architecture (Gemma: 1)."""
    return file_family(reader, path).gguf_norm_shift


def config_from_gguf(reader, path):
    family = file_family(reader, path)
    meta = _Meta(reader, family.llamacpp_arch)
    g = meta.get
    tokens = field(reader, "tokenizer.ggml.tokens") or []
    names = {t.name for t in reader.tensors}
    heads = g("attention.head_count")
    config = {
        "model_type": family.model_type,
        "hidden_size": g("embedding_length"),
        "num_hidden_layers": g("block_count"),
        "intermediate_size": g("feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": g("attention.head_count_kv", heads),
        "rms_norm_eps": g("attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": g("rope.freq_base", 10000.0),
        "max_position_embeddings": g("context_length", 4096),
        "vocab_size": g("vocab_size", len(tokens)) or len(tokens),
        "tie_word_embeddings": "output.weight" not in names,
        # with the traditional (interleaved) rope, the rows llama.cpp's converter permuted give the original model
        # exactly
        "rope_traditional": family.permutes_qk,
    }
    if g("attention.key_length"):
        config["head_dim"] = g("attention.key_length")
    try:
        if family.gguf_config is not None:
            config.update(family.gguf_config(meta, config))
        if family_io(family) is not None:
            config = family_io(family).store_config(g, config)
    except ValueError as e:
        raise SourceError(f"{path}: {e}") from None
    if None in config.values():
        missing = [k for k, v in config.items() if v is None]
        raise SourceError(f"{path}: GGUF metadata lacks {missing}")
    return config


class TensorInfo(NamedTuple):
    """What reading one tensor needs from the header, kept without the reader (whose parsed fields can be large)."""
    name: str
    tensor_type: object
    shape: tuple
    n_elements: int
    n_bytes: int
    data_offset: int

    @classmethod
    def of(cls, t):
        return cls(t.name, t.tensor_type, tuple(int(s) for s in t.shape), int(t.n_elements), int(t.n_bytes),
                   int(t.data_offset))


def tensor_bytes(tensor, path):
    """A tensor's bytes, read from its offset in the file into an array of their own, freed when it is dropped.
    Reading through the reader's map of the whole file would keep every page read resident (and counted in this
    process's RSS) as long as the reader lives, which is the whole conversion: this holds one tensor's bytes."""
    n = int(tensor.n_bytes)
    try:
        raw = np.fromfile(path, np.uint8, n, offset=int(tensor.data_offset))
    except (OSError, ValueError) as e:
        raise SourceError(f"{path}: tensor {tensor.name} could not be read ({e})") from None
    if raw.size != n:
        raise SourceError(f"{path}: tensor {tensor.name} is cut short ({raw.size} of {n} bytes; truncated file?)")
    return raw


def read_tensor(tensor, path, quantize_to=(64, 4), requantize=None, transform=None):
    """One GGUF tensor -> ({suffix: array}, quant): quant is (group_size, bits) for affine weights, a GGML type name
    for blocks kept packed (ggml_types.py), None for dense. GGML-quantized tensors are kept exactly as the file has
    them unless `requantize` (a list) asks for them to follow `quantize_to` too: it then receives (squared error,
    squared norm) of each re-quantized tensor against the file's values. Dense matrices follow `quantize_to`.
    transform: the family's f(arrays) -> arrays (its io module's store_transform), applied to the tensor as the
    store keeps it, before any quantization."""
    from .ggml_types import convert
    from ..ops.linear import Frozen, dense as dense_of
    shape = [int(s) for s in reversed(tensor.shape)]  # GGUF lists the fastest dim first
    qtype = tensor.tensor_type
    arrays, quant = convert(tensor_bytes(tensor, path), getattr(qtype, "name", str(qtype)), shape,
                            f"{path}: tensor {tensor.name}")
    for k in list(arrays):  # one numpy array and its MLX copy at a time
        arrays[k] = mx.array(arrays.pop(k))
    if quant is not None and requantize is not None and quantize_to:
        w = (Frozen(arrays["weight"], ggml=quant) if isinstance(quant, str) else
             Frozen(arrays["weight"], arrays["scales"], arrays["biases"], group_size=quant[0], bits=quant[1]))
        arrays, quant = {"weight": dense_of(w)}, None
    if transform is not None:
        arrays = transform(arrays)
    dense = arrays["weight"]
    if quant is None and dense.ndim != 2:  # norms, biases in fp32: Gemma's (1 + w) - 1 in fp16 would round w
        return {"weight": dense.astype(mx.float32)}, None
    if quant is None and quantize_to and dense.ndim == 2 and dense.shape[1] % quantize_to[0] == 0:
        group, bits = quantize_to
        w, s, b = mx.quantize(dense.astype(mx.float32), group_size=group, bits=bits)
        s, b = s.astype(mx.float16), b.astype(mx.float16)
        if requantize is not None:
            ref = dense.astype(mx.float32)
            err = mx.dequantize(w, s.astype(mx.float32), b.astype(mx.float32), group_size=group, bits=bits) - ref
            requantize.append((mx.sum(err * err).item(), mx.sum(ref * ref).item()))
        return {"weight": w, "scales": s, "biases": b}, (group, bits)
    return arrays, quant


def gguf_tensors(reader, path):
    """Yields (hf module path, tensor) in the file's architecture's naming; checks the tensor count against the
    header first."""
    family = file_family(reader, path)
    declared = field(reader, "GGUF.tensor_count")
    if declared is not None and int(declared) != len(reader.tensors):
        raise SourceError(f"{path}: header declares {declared} tensors but {len(reader.tensors)} were found "
                          "(truncated file?)")
    io = family_io(family)
    for t in reader.tensors:
        if t.name in family.gguf_config_tensors:  # read into the config (config_from_gguf)
            continue
        if io is not None:
            try:
                yield io.store_name(t.name), t
            except KeyError:
                raise SourceError(f"{path}: unexpected tensor {t.name}") from None
            continue
        if not t.name.endswith((".weight", ".bias")):
            raise SourceError(f"{path}: unexpected tensor {t.name}")
        yield hf_name(t.name, family), t
