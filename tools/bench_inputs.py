"""What the benchmarks train on: the projections they adapt, a batch of real text (this Python's own
`json/decoder.py`, on every machine) cut to T tokens as mlx-lm's loader cuts it, and model specs, with
`preset:NAME` models generated once by tools/make_model.py. Shared by bench_memory, count_kernels and the other
benches (so none of them imports another)."""
import sys
import sysconfig
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
KEYS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj"]


def text_tokens(tokenizer, n):
    text = (Path(sysconfig.get_paths()["stdlib"]) / "json" / "decoder.py").read_text()
    ids = tokenizer.encode(text)
    return (ids * (1 + n // len(ids)))[:n]


def bench_text(tokenizer, seq):
    """The batch's text: longer than seq + 1 tokens, so every method, mlx-lm's data loader included, cuts it."""
    return tokenizer.decode(text_tokens(tokenizer, seq + 64))


def bench_ids(tokenizer, seq):
    """The seq + 1 tokens of the batch (seq inputs, seq targets): the text re-encoded as mlx-lm's loader encodes it,
    so the engines and mlx-lm see the same tokens."""
    return tokenizer.encode(bench_text(tokenizer, seq))[:seq + 1]


def resolve_model(spec):
    """A model spec as load_model takes it; `preset:NAME[,key=value...]` is generated once (tools/make_model.py)
    into the cache and its directory returned."""
    if not spec.startswith("preset:"):
        return spec
    import os
    from make_model import make_model
    from mesp_mlx.io.sources import cache_root
    name, *opts = spec[len("preset:"):].split(",")
    kw = {}
    for o in opts:
        k, _, v = o.partition("=")
        if k not in ("layers", "vocab", "seed", "dtype"):
            raise SystemExit(f"{spec}: unknown option {k!r} (layers, vocab, seed, dtype)")
        kw[k] = v if k == "dtype" else int(v)
    out = cache_root() / "random" / "-".join([name] + [f"{k}{v}" for k, v in sorted(kw.items())])
    if not (out / "config.json").exists():  # make_model renames a finished directory into place
        print(f"generating {spec} into {out} ...", file=sys.stderr, flush=True)
        make_model(name, out, **kw)
    return str(out)
