"""Adapters in exactly mlx-lm's format, written atomically (temporary file, then rename): a crash never leaves a
half-written adapter in place of a good one; and an adapter folder held by one writing process at a time."""
import errno
import fcntl
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..lora import from_flat, to_flat
from . import SourceError


def atomic_save_safetensors(path, arrays, metadata=None):
    """Write beside the target, then rename over it: readers see the old file or the new one, never a part. A failed
    write (full disk, read-only directory) removes its temporary file and leaves the old one in place."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp.safetensors")
    try:
        mx.save_safetensors(str(tmp), arrays, metadata=metadata or {})
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        tmp.unlink(missing_ok=True)
        raise SourceError(f"{path}: could not write it ({getattr(e, 'strerror', None) or e}); "
                          "the previous file, if any, is intact") from None


def atomic_write_text(path, text, error=SourceError, private=False):
    """`text` as UTF-8, written beside `path` and renamed over it: the file is whole or absent. A failed write removes
    its temporary file and raises `error`. private: readable by its owner only (else the umask's usual mode)."""
    path, tmp = Path(path), None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            if not private:
                umask = os.umask(0)
                os.umask(umask)
                os.fchmod(f.fileno(), 0o666 & ~umask)  # mkstemp's is 0600
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        raise error(f"{path}: could not write it ({e.strerror or e})") from None


@contextmanager
def atomic_directory(out):
    """Yields a temporary directory beside `out`; when the block succeeds it replaces `out` (an interrupted or failed
    export leaves the previous directory as it was, never a mix of old and new files)."""
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would stay on the folder the user gets
    except OSError as e:
        raise SourceError(f"{out}: cannot create it ({e.strerror or e})") from None
    try:
        yield tmp
        old = out.with_name(f".{out.name}.old-{os.getpid()}") if out.exists() else None
        if old:
            os.replace(out, old)
        os.replace(tmp, out)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except (OSError, RuntimeError) as e:  # MLX reports a failed save (full disk) as a RuntimeError
        raise SourceError(f"{out}: could not write it ({e.strerror or e}); the previous one, if any, is intact") \
            from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def model_prefix(model_path):
    """The adapter-name prefix of the model at `model_path` (models.mlx_lm_prefix; "" where its config cannot be
    read)."""
    from ..models import ARCHITECTURES
    try:
        kind = json.loads((Path(model_path) / "config.json").read_text()).get("model_type")
    except (OSError, json.JSONDecodeError, AttributeError):
        return ""
    return ARCHITECTURES[kind].FAMILY.mlx_lm_prefix if kind in ARCHITECTURES else ""


def value_head_order(flat, args, to_store):
    """Adapter tensors between mlx-lm's order and the store's: a store whose out_proj reads the value heads in
    llama.cpp's tiled order (ModelArgs.linear_out_tiled) has out_proj's lora_a rows (in, r) in that order, every
    file has them in mlx-lm's (Hugging Face's grouped) order. to_store: file -> store; else store -> file. flat:
    names -> MLX or numpy arrays; returned as it is for any other store."""
    if not args.linear_out_tiled:
        return flat
    from .qwen35_gguf import value_rows
    perm = value_rows(args, args.linear_value_head_dim)  # tiled[j] = grouped[perm[j]]
    idx = perm if to_store else np.argsort(perm)
    out = dict(flat)
    for name, arr in flat.items():
        if name.endswith("linear_attn.out_proj.lora_a"):
            out[name] = arr[mx.array(idx)] if isinstance(arr, mx.array) else np.ascontiguousarray(arr[idx])
    return out


def _tiled(model_path):
    """Whether the store at `model_path` keeps out_proj's value heads tiled (value_head_order)."""
    from ..models.qwen3_5 import TILED_KEY
    try:
        return bool(json.loads((Path(model_path) / "config.json").read_text()).get(TILED_KEY))
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def save_adapter(out_dir, params, lora_cfg, model_path, step=None):
    """adapters.safetensors (and a numbered copy at `step`) and adapter_config.json, named as mlx-lm's module tree
    of the model at `model_path` names them (its family's mlx_lm_prefix), in mlx-lm's row order
    (value_head_order)."""
    from .store import WeightStore
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    flat = {k: v.astype(mx.float32) for k, v in to_flat(params, model_prefix(model_path)).items()}
    if _tiled(model_path):
        flat = value_head_order(flat, WeightStore(model_path).args, to_store=False)
    config = {"fine_tune_type": "lora", "model": str(model_path), "num_layers": lora_cfg.num_layers,
              "lora_parameters": {"rank": lora_cfg.rank, "scale": lora_cfg.scale, "dropout": lora_cfg.dropout,
                                  "keys": list(lora_cfg.keys)}}
    if step is not None:
        atomic_save_safetensors(out / f"{step:07d}_adapters.safetensors", flat)
    atomic_save_safetensors(out / "adapters.safetensors", flat)
    atomic_write_text(out / "adapter_config.json", json.dumps(config, indent=2))


RESUME_FILE = "resume.safetensors"
LOCK_FILE = ".mesp-lock"


@contextmanager
def hold_folder(out, lock=True):
    """Creates the adapter folder and holds it for this process while the block runs: an exclusive `flock` on a file
    in it, which the OS drops when the process ends however it ends (SIGKILL too), so a killed holder never blocks the
    next run. The holder writes its pid there, for the refusal a second writer gets. lock=False: create and check
    only (the other processes of a data-parallel group, whose first process holds the folder)."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SourceError(f"{out}: cannot create the adapter directory ({e.strerror})") from None
    if not os.access(out, os.W_OK):
        raise SourceError(f"{out}: adapter directory is not writable")
    if not lock:
        yield out
        return
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise SourceError(f"{out / LOCK_FILE}: cannot lock it ({e.strerror})") from None
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise SourceError(f"{out}: in use by another run (pid {holder}); wait for it to finish or use another "
                              "--adapter-path") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield out
    finally:
        os.close(fd)  # closing the last descriptor releases the lock


def split_float64(arrays):
    """MLX writes no F64 safetensors (float64 runs keep float64 optimizer state): each such array is stored as the
    uint32 words of its bits, its shape kept in the metadata, which `join_float64` turns back bit for bit."""
    shapes = {k: list(v.shape) for k, v in arrays.items() if v.dtype == mx.float64}
    words = {k: arrays[k].reshape(-1).view(mx.uint32) for k in shapes}
    return dict(arrays, **words), ({"float64": json.dumps(shapes)} if shapes else {})


def join_float64(arrays, meta):
    shapes = json.loads(meta.get("float64", "{}"))
    return dict(arrays, **{k: arrays[k].view(mx.float64).reshape(shape) for k, shape in shapes.items()})


def save_resume(out_dir, params, opt_state, state):
    """Everything `--resume` needs in one file, replaced atomically: the LoRA parameters ("params/<name>"), the
    optimizer state ("opt/<key>" or "opt/<param name>/<slot>") and `state` (JSON: step, data position, RNG, config)."""
    arrays = {f"params/{k}": v for k, v in to_flat(params).items()}
    for k, v in opt_state.items():
        if isinstance(v, dict):
            arrays.update({f"opt/{k}/{slot}": a for slot, a in v.items()})
        else:
            arrays[f"opt/{k}"] = v
    arrays, meta = split_float64(arrays)
    atomic_save_safetensors(Path(out_dir) / RESUME_FILE, arrays, {"state": json.dumps(state), **meta})


def load_resume(out_dir):
    """-> (params, optimizer state, state) or None when there is no checkpoint."""
    path = Path(out_dir) / RESUME_FILE
    if not path.exists():
        return None
    try:
        arrays, meta = mx.load(str(path), return_metadata=True)
        state = json.loads(meta["state"])
        arrays = join_float64(arrays, meta)
    except Exception as e:
        raise SourceError(f"{path}: not a readable checkpoint ({e}); remove it to start over") from None
    params = from_flat({k[len("params/"):]: v for k, v in arrays.items() if k.startswith("params/")})
    opt = {}
    for k, v in arrays.items():
        if k.startswith("opt/"):
            parts = k[len("opt/"):].split("/")
            if len(parts) == 1:
                opt[parts[0]] = v
            else:
                opt.setdefault(parts[0], {})[parts[1]] = v
    return params, opt, state
