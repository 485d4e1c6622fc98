"""Conversion streams: one source tensor read and converted at a time, one store file (block) written and released
at a time, whatever the model's size; a conversion stopped halfway leaves nothing taken for a store."""
import os
import subprocess
import sys
import tracemalloc

import mlx.core as mx
import numpy as np
import pytest

from builders import write_tiny, write_tiny_gguf
from mesp_mlx.io import SourceError
from mesp_mlx.io.sources import cache_root, convert_gguf, convert_hf_dir, load_model
from mesp_mlx.io.store import STORE_MARK, store_file

LAYERS = 16


class Held:
    """What a conversion holds, from stream_store's watch: the converted bytes not yet written and released, the
    most of them at once, and each tensor's file checked against the file saved next."""

    def __init__(self, n_layers):
        self.n, self.held, self.most, self.pending, self.saved = n_layers, 0, 0, [], []

    def __call__(self, event, name, nbytes):
        if event == "tensor":
            self.held += nbytes
            self.most = max(self.most, self.held)
            self.pending.append(name)
        else:
            assert all(store_file(t, self.n) == name for t in self.pending), (name, self.pending)
            assert nbytes == self.held
            self.held, self.pending = 0, []
            self.saved.append(name)


def largest_file(out):
    return max(f.stat().st_size for f in out.glob("model-*.safetensors"))


def check_streamed(out, held, peak_bytes):
    """One file's converted tensors at a time, and the memory really used (MLX's or numpy's) bounded by a few
    files, not the model."""
    total = sum(f.stat().st_size for f in out.glob("model-*.safetensors"))
    assert len(held.saved) == LAYERS + 1 and held.held == 0
    assert held.most <= largest_file(out)
    assert total > 8 * largest_file(out)  # so that holding the model would show
    assert peak_bytes < 4 * largest_file(out) < total / 2, (peak_bytes, largest_file(out), total)


def test_hf_dir_converts_one_block_at_a_time(tmp_path):
    d = write_tiny(tmp_path / "m", "llama", num_hidden_layers=LAYERS)
    out = tmp_path / "store"
    out.mkdir()
    held = Held(LAYERS)
    mx.eval(mx.zeros(1))
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    convert_hf_dir(d, out, watch=held)
    check_streamed(out, held, mx.get_peak_memory() - base)
    assert held.saved[0] == "model-embed.safetensors"


def test_gguf_converts_one_block_at_a_time(tmp_path):
    f = tmp_path / "m.gguf"
    write_tiny_gguf(f, "qwen2", "Q8_0", num_hidden_layers=LAYERS)
    out = tmp_path / "store"
    out.mkdir()
    held, peaks = Held(LAYERS), []

    def watch(event, name, nbytes):  # numpy reports its buffers to tracemalloc: the tensors' bytes, their repacking
        held(event, name, nbytes)
        if event == "saved":  # the peak while this file was made, above what was held when the last one was saved
            now, peak = tracemalloc.get_traced_memory()
            peaks.append((peak, now))
            tracemalloc.reset_peak()

    tracemalloc.start()
    try:
        convert_gguf(f, out, watch=watch)
    finally:
        tracemalloc.stop()
    check_streamed(out, held, 0)
    # Python's and numpy's heap while each block is converted, above what it held when the previous one was saved
    # (the reader's parsed header, read before the first): the tensors' bytes and their repacking, one at a time
    # (Q8_0 levels unpacked to uint32 and packed again: ~13 times the tensor's bytes, in chunks of at most 4 MB
    # of rows for a large tensor)
    import gguf
    sizes = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(str(f)).tensors}
    largest = max(n for name, n in sizes.items() if name.startswith("blk."))
    grown = [peak - before for (peak, _), (_, before) in zip(peaks[1:], peaks)]
    assert max(grown) < 16 * largest < sum(sizes.values()) / 4, (grown, largest, sum(sizes.values()))
    assert max(grown[-4:]) < 1.1 * max(grown[:4]), grown  # the same for the last blocks as for the first
    assert peaks[-1][1] - peaks[0][1] < largest_file(out), peaks  # nothing kept from one block to the next


def test_row_chunked_quantization_is_exact(monkeypatch):
    from mesp_mlx.io import sources
    w = mx.random.normal((300, 256)).astype(mx.bfloat16)
    whole = sources._quantize("w", w, (64, 4))[0]
    monkeypatch.setattr(sources, "QUANTIZE_ELEMENTS", 256 * 7)  # 43 chunks, the last one short
    chunked = sources._quantize("w", w, (64, 4))[0]
    for k in whole:
        assert np.array_equal(np.array(whole[k]), np.array(chunked[k])), k


def test_interrupted_conversion_leaves_no_store(tmp_path):
    """Stopped by an error after two files, and killed (SIGKILL) after two files: neither leaves a directory a
    later run reads as a store, and the next load converts the whole model."""
    d = write_tiny(tmp_path / "m", "llama", num_hidden_layers=4)
    models = cache_root() / "models"

    def stop(event, name, nbytes):
        if event == "saved" and name == "model-layer-0000.safetensors":
            raise SourceError("stopped")

    from mesp_mlx.io.sources import _identity, _in_cache
    key = _identity("dir", [p for p in d.iterdir() if p.is_file()], (64, 4))
    with pytest.raises(SourceError, match="stopped"):
        _in_cache(d.name, key, lambda out: convert_hf_dir(d, out, watch=stop))
    assert not (models / f"{d.name}-{key}").exists()
    assert not list(models.glob(f".{d.name}-*"))  # the temporary directory is removed
    kill = ("import os, signal, sys\nfrom pathlib import Path\nfrom mesp_mlx.io.sources import convert_hf_dir, "
            "_in_cache\n"
            "def watch(event, name, nbytes):\n"
            "    if event == 'saved' and name == 'model-layer-0000.safetensors':\n"
            "        os.kill(os.getpid(), signal.SIGKILL)\n"
            f"_in_cache(sys.argv[1], sys.argv[2], lambda out: convert_hf_dir(Path(sys.argv[3]), out, watch=watch))\n")
    run = subprocess.run([sys.executable, "-c", kill, d.name, key, str(d)], env=dict(os.environ), timeout=300)
    assert run.returncode == -9
    left = list(models.glob(f".{d.name}-*"))
    assert left and (left[0] / "model-layer-0000.safetensors").exists()  # a half store, in its hidden temp dir
    assert not (left[0] / STORE_MARK).exists() and not (models / f"{d.name}-{key}").exists()
    store = load_model(str(d))
    assert store.path == models / f"{d.name}-{key}" and (store.path / STORE_MARK).exists()
    assert all((store.path / f"model-layer-{i:04d}.safetensors").exists() for i in range(4))


def test_progress_bar_quiet_off_a_terminal(tmp_path, capfd):
    from mesp_mlx.io.store import stream_store
    config = {"num_hidden_layers": 1}
    sizes = {"model.embed_tokens.weight": 1 << 30, "model.layers.0.mlp.up_proj.weight": 1 << 30}
    stream_store(tmp_path, config, sizes, lambda name: ({name: mx.zeros((2, 2))}, {}))
    assert capfd.readouterr().err == ""
    assert (tmp_path / "model-layer-0000.safetensors").exists() and (tmp_path / "config.json").exists()
