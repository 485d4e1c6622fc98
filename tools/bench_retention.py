"""The retention check on saved adapters, beside their base: one markdown row per adapter folder.

    python tools/bench_retention.py ADAPTER_DIR [ADAPTER_DIR ...]

Each folder's base comes from its adapter_config.json; both are scored as a run scores them at its end
(mesp_mlx/retention.py: the shipped questions through the model's chat template, greedy, and the loss on the shipped
general text)."""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None):
    from mesp_mlx.blas import ensure_fast_blas
    ensure_fast_blas()
    import mlx.core as mx
    from mesp_mlx.engines import make_engine
    from mesp_mlx.io.formats.mlx_lm import model_named
    from mesp_mlx.io.sources import load_model
    from mesp_mlx.lora import from_flat
    from mesp_mlx.retention import MAX_TOKENS, load_retention_set, score
    from mesp_mlx.sampler import Generator
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("adapters", nargs="+")
    p.add_argument("--seq", type=int, default=256)
    a = p.parse_args(argv)
    print("| adapter | answers base | answers after | general loss base | after | change | scored in (base, after) |\n"
          "|---|---|---|---|---|---|---|")
    for ad in map(Path, a.adapters):
        store = load_model(model_named(ad))
        tok = store.tokenizer()
        scale = json.loads((ad / "adapter_config.json").read_text())["lora_parameters"]["scale"]
        rset = load_retention_set(None, tok, True, store.args.max_position_embeddings, MAX_TOKENS)
        engine = make_engine("mesp", store, scale)
        params = from_flat(mx.load(str(ad / "adapters.safetensors")))
        generator, took = Generator(store), []

        def timed(q):
            t0 = time.perf_counter()
            out = score(generator, tok, rset, engine, q, scale, a.seq)
            took.append(time.perf_counter() - t0)
            return out
        base, now = timed({}), timed(params)
        change = (now["general_loss"] - base["general_loss"]) / base["general_loss"]
        print(f"| {ad} | {base['answers']}/{base['questions']} | {now['answers']}/{now['questions']} | "
              f"{base['general_loss']:.3f} | {now['general_loss']:.3f} | {change:+.1%} | {took[0]:.1f} s, "
              f"{took[1]:.1f} s |", flush=True)


if __name__ == "__main__":
    main()
