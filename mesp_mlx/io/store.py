"""The weight store: a model converted once into one safetensors file per block, read back one block at a time.

Layout (also a valid mlx-lm model directory, so `mlx_lm generate --model <store>` works on it, unless it keeps GGML
blocks that no affine group represents, marked {"ggml_type": ...} in the quantization entry: mlx-lm cannot read those):
    config.json                  Hugging Face config + mlx-lm "quantization" (per-module entries where they differ)
    model-embed.safetensors      model.embed_tokens.*, model.norm.weight, lm_head.* (untied heads)
    model-layer-0000.safetensors model.layers.0.* ...
    tokenizer files, mesp_store.json (what it was converted from)

`mx.load` of safetensors is lazy: `store.layer(i)` maps the file and reads only what is evaluated, and the arrays are
freed once the caller drops them. This is how the trainers stream the frozen base: at most one block's weights (plus
the one being prefetched by MLX's graph) is resident.
"""
import json
import struct
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..models import model_args
from ..ops.linear import Frozen, embedding_rows
from . import SourceError

EMBED_FILE = "model-embed.safetensors"
STORE_MARK = "mesp_store.json"
MODULE_LEAVES = ("weight", "scales", "biases", "bias")  # a module's tensors; any other leaf is a plain parameter


def stored_tensors(path, w):
    """The store's tensors for one plain array of `WeightStore.layer` (the inverse of its grouping): a norm's or
    conv1d's weight, or a parameter under its own path."""
    if path.endswith("conv1d"):
        return {f"{path}.weight": w[..., None]}
    if path.endswith("norm"):
        return {f"{path}.weight": w}
    return {path: w}


def layer_file(i):
    return f"model-layer-{i:04d}.safetensors"


def quant_config(quants):
    """mlx-lm's "quantization" entry from {module path: (group, bits), a GGML type name (blocks kept packed) or
    None}: the commonest affine kind as the default, packed modules as {"ggml_type": name} (which mlx-lm cannot
    read: such a store is ours alone)."""
    kinds = [q for q in quants.values() if isinstance(q, tuple)]
    packed = {path: {"ggml_type": q} for path, q in sorted(quants.items()) if isinstance(q, str)}
    if not kinds:
        return packed or None
    default = max(set(kinds), key=kinds.count)
    out = {"group_size": default[0], "bits": default[1]}
    for path, q in sorted(quants.items()):
        if isinstance(q, tuple) and q != default:
            out[path] = {"group_size": q[0], "bits": q[1]}
    return dict(out, **packed)


PROGRESS_BYTES = 16 << 20  # a conversion reading more shows a progress bar (on a terminal)


def write_config(out_dir, config, quants):
    """config.json: the model's config with mlx-lm's quantization entries for `quants`."""
    q = quant_config(quants)
    config = dict(config)
    if q:
        config["quantization"] = q
        config["quantization_config"] = {k: v for k, v in q.items() if k in ("group_size", "bits")}
        if not config["quantization_config"]:
            del config["quantization_config"]
    (Path(out_dir) / "config.json").write_text(json.dumps(config, indent=2))


def store_file(name, n):
    """The store file tensor `name` (store naming) belongs to in an n-layer model."""
    parts = name.split(".")
    if parts[:2] != ["model", "layers"]:
        return EMBED_FILE
    i = int(parts[2])
    if not 0 <= i < n:
        raise SourceError(f"tensor {name} names layer {i} of a {n}-layer model")
    return layer_file(i)


def plan_files(names, n):
    """{store file: [tensor names]}, the embedding file first, names in the order given; refuses a model with a
    layer that has no tensors before anything is converted."""
    files = {EMBED_FILE: []}
    for name in names:
        files.setdefault(store_file(name, n), []).append(name)
    missing = [layer_file(i) for i in range(n) if layer_file(i) not in files]
    if missing:
        raise SourceError(f"the model has no weights for {len(missing)} of its {n} layers")
    return files


def write_store(out_dir, config, tensors, quants):
    """tensors: {full name: array} already made, written one store file at a time; quants: {module path:
    (group, bits)|None}. (Conversions stream instead: `stream_store`.)"""
    stream_store(out_dir, config, {k: a.nbytes for k, a in tensors.items()},
                 lambda name: ({name: tensors.pop(name)}, {}), quants=quants)


def stream_store(out_dir, config, sizes, convert, quants=None, label="model", watch=None):
    """Writes a store one file at a time, converting one source tensor at a time.

    sizes: {source tensor name (store naming, which decides its file): bytes it reads}, in the order to write;
    convert(name) -> ({full name: array}, {module path: quant}) reads and converts one tensor. Its arrays are
    evaluated as they come, a file is saved once all of its tensors are, and they are released (with MLX's buffer
    cache) before the next file is begun. So the conversion holds at most one store file's converted arrays (one
    block; the embedding file: embedding, final norm and an untied head) plus one source tensor and the
    temporaries of its conversion (which the converters bound). config.json is written last, with the quantization
    the quants of all tensors make. A progress bar with bytes and time left goes to stderr for more than
    PROGRESS_BYTES, on a terminal only. watch(event, name, nbytes), if given, sees each step: ("tensor", source
    name, bytes of its converted arrays now held) and ("saved", file name, bytes released)."""
    from tqdm import tqdm
    out_dir = Path(out_dir)
    quants = dict(quants or {})
    files = plan_files(sizes, config["num_hidden_layers"])
    total = sum(sizes.values())
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"converting {label}",
              file=sys.stderr, dynamic_ncols=True, leave=False,
              disable=None if total > PROGRESS_BYTES else True) as bar:
        for fname, names in files.items():
            arrays, out = {}, {}
            for name in names:
                out, q = convert(name)
                mx.eval(list(out.values()))
                arrays.update(out)
                quants.update(q)
                bar.update(sizes[name])
                if watch:
                    watch("tensor", name, sum(a.nbytes for a in out.values()))
            mx.save_safetensors(str(out_dir / fname), arrays)
            held = sum(a.nbytes for a in arrays.values())
            del arrays, out
            mx.clear_cache()
            if watch:
                watch("saved", fname, held)
    write_config(out_dir, config, quants)


_NP_TYPES = {"U32": np.uint32, "F32": np.float32, "F16": np.float16, "BF16": np.uint16, "U8": np.uint8}


class RowReader:
    """Rows of the tensors in one safetensors file, read straight from the (page-cached) file: `mx.load` would read a
    whole tensor to slice it, and the embedding table / LM head is the largest tensor of a small model."""

    def __init__(self, path):
        self.path = path
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            self.header = json.loads(f.read(n))
        self.base, self.tables = 8 + n, {}

    def take(self, name, index):
        """Rows `index` (a slice or an int array) of tensor `name`; only those bytes are read."""
        meta = self.header[name]
        dtype, shape = meta["dtype"], meta["shape"]
        if dtype not in _NP_TYPES:
            raise SourceError(f"{self.path}: {name} has dtype {dtype}, which row reads do not support")
        if name not in self.tables:  # mapped once per reader, read row range by row range
            self.tables[name] = np.memmap(self.path, _NP_TYPES[dtype], "r", self.base + meta["data_offsets"][0],
                                          (shape[0], int(np.prod(shape[1:]))))
        out = mx.array(np.ascontiguousarray(self.tables[name][index]))
        out = out.reshape(out.shape[0], *shape[1:])
        return out.view(mx.bfloat16) if dtype == "BF16" else out


class StoredRows:
    """A frozen (out x in) matrix kept in the store and read a range of rows (output units) at a time: the LM head
    and the embedding table. Offers `out_dims` and `rows(start, stop)` like `Frozen`."""

    def __init__(self, store, module):
        self.store, self.module = store, module
        self.reader = RowReader(store.path / EMBED_FILE)
        self.out_dims = self.reader.header[f"{module}.weight"]["shape"][0]
        sizes = [m["data_offsets"][1] - m["data_offsets"][0] for k, m in self.reader.header.items()
                 if k.startswith(module + ".")]
        self.row_bytes = sum(sizes) // self.out_dims
        self.affine = f"{module}.scales" in self.reader.header  # quantized products read it packed

    def rows(self, start, stop):
        return self._take(slice(start, stop))

    def _take(self, index):
        names = [n for n in ("weight", "scales", "biases", "bias") if f"{self.module}.{n}" in self.reader.header]
        arrays = {f"{self.module}.{n}": self.reader.take(f"{self.module}.{n}", index) for n in names}
        return self.store._frozen(arrays, self.module, self.module)

    def table(self, ids):
        """(the distinct rows among token ids as a `Frozen`, each id's index into them (ids' shape)): only those
        rows are read."""
        uniq, inverse = np.unique(np.asarray(ids).reshape(-1), return_inverse=True)
        return self._take(uniq), mx.array(inverse.reshape(np.shape(ids)))

    def gather(self, ids, dtype=mx.float32):
        """Rows for token ids (any shape), dequantized to `dtype`; reads only the distinct rows."""
        table, idx = self.table(ids)
        return embedding_rows(table, idx.reshape(-1), dtype).reshape(*ids.shape, -1)


class WeightStore:
    def __init__(self, path):
        self.path = Path(path)
        try:
            self.config = json.loads((self.path / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SourceError(f"{self.path / 'config.json'}: cannot read ({e})") from None
        self.args = model_args(self.config, where=str(self.path / "config.json"))
        self.quantization = self.config.get("quantization") or {}

    @property
    def num_layers(self):
        return self.args.num_hidden_layers

    def _load(self, fname):
        try:
            return mx.load(str(self.path / fname))
        except Exception as e:
            raise SourceError(f"{self.path / fname}: cannot read ({e})") from None

    def _frozen(self, arrays, module, full_name):
        w = arrays.get(f"{module}.weight")
        if w is None:
            raise SourceError(f"{self.path}: no weight for {module}")
        bias = arrays.get(f"{module}.bias")
        q = self.quantization.get(full_name, self.quantization)
        if "ggml_type" in q:
            return Frozen(w, bias=bias, ggml=q["ggml_type"])
        if f"{module}.scales" not in arrays:
            return Frozen(w, bias=bias)
        return Frozen(w, arrays[f"{module}.scales"], arrays.get(f"{module}.biases"), bias,
                      q.get("group_size", 64), q.get("bits", 4))

    def layer_bytes(self):
        """Size of the largest block's weights (what streaming holds for one block)."""
        return max((self.path / layer_file(i)).stat().st_size for i in range(self.num_layers))

    def packed_types(self):
        """{module path: GGML type} of the matrices kept as packed GGML blocks (ops/ggml.py), which every product
        dequantizes on the fly; empty for stores mlx-lm reads."""
        return {k: v["ggml_type"] for k, v in self.quantization.items() if isinstance(v, dict) and "ggml_type" in v}

    @property
    def mlx_lm_readable(self):
        """False where the store keeps packed GGML blocks (mlx-lm has no such layer) or out_proj columns in llama.cpp's
        tiled value-head order (ModelArgs.linear_out_tiled: mlx-lm would read them as other heads)."""
        return not self.args.linear_out_tiled and not any(isinstance(v, dict) and "ggml_type" in v for v in self.quantization.values())

    @property
    def info(self):
        """What the store was converted from (mesp_store.json: source, kind, source_bits_per_weight, ...)."""
        try:
            return json.loads((self.path / STORE_MARK).read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def bits_per_weight(self):
        """Bits each weight of the store's matrices costs as stored (levels, scales and biases; embedding and head
        included): 32 for fp32, 4.5 for 4-bit group 64 with fp16 scales, 6.5625 for Q6_K blocks kept packed, 6 for
        Q4_K kept with fp32 scales and biases."""
        from ..ops.ggml import PACKED
        bits = count = 0
        for f in sorted(self.path.glob("model-*.safetensors")):
            header = RowReader(f).header
            for name, meta in header.items():
                if not name.endswith(".weight") or len(meta["shape"]) != 2:
                    continue
                module = name[:-len(".weight")]
                rows, cols = meta["shape"]
                q = self.quantization.get(module, self.quantization)
                if "ggml_type" in q:
                    size, width, _ = PACKED[q["ggml_type"]]
                    count += rows * cols // size * width
                elif f"{module}.scales" in header:
                    count += rows * cols * 32 // q.get("bits", 4)
                else:
                    count += rows * cols
                bits += 8 * sum(header[k]["data_offsets"][1] - header[k]["data_offsets"][0]
                                for k in (name, f"{module}.scales", f"{module}.biases") if k in header)
        return bits / count

    def layer(self, i):
        """Block i's frozen weights by module path, lazily read: projections as `Frozen`, and as plain arrays the
        norm weights, a conv1d's taps (C, K) and parameters that are no module's weight (Qwen3.5's A_log,
        dt_bias), by their own path."""
        prefix = f"model.layers.{i}."
        arrays = {k[len(prefix):]: v for k, v in self._load(layer_file(i)).items()}
        out, modules = {}, set()
        for name, arr in arrays.items():
            module, leaf = name.rsplit(".", 1)
            if leaf in MODULE_LEAVES:
                modules.add(module)
            else:
                out[name] = arr
        for module in modules:
            if module.endswith("norm"):
                out[module] = arrays[f"{module}.weight"]
            elif module.endswith("conv1d"):  # mlx-lm's Conv1d weight [C, K, 1] (depthwise)
                w = arrays[f"{module}.weight"]
                out[module] = w.reshape(w.shape[0], -1)
            else:
                out[module] = self._frozen(arrays, module, prefix + module)
        return out

    def _top(self, module):
        return self._frozen(self._load(EMBED_FILE), module, module)

    def embedding(self):
        return self._top("model.embed_tokens")

    def head(self):
        return self.embedding() if self.args.tie_word_embeddings else self._top("lm_head")

    def head_rows(self):
        """The head as `StoredRows`, for the chunked loss."""
        return StoredRows(self, "model.embed_tokens" if self.args.tie_word_embeddings else "lm_head")

    def embed(self, ids, dtype=mx.float32):
        """Embeddings of token ids in `dtype` as the first block takes them (times the family's scale: Gemma's
        sqrt(d)), reading only the rows needed from the store."""
        x = StoredRows(self, "model.embed_tokens").gather(ids, dtype)
        return x if self.args.embed_scale == 1.0 else x * self.args.embed_scale

    def final_norm(self):
        return self._load(EMBED_FILE)["model.norm.weight"]

    def tokenizer(self):
        from .tokenizer import load_tokenizer
        return load_tokenizer(self.path)
