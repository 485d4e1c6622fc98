"""`python -m mesp_mlx.export`: the command line over `io.formats.export_adapter` (thin by design). It turns
an adapter folder written by `mesp_mlx.train` (or mlx-lm) into mlx-lm's folder, a GGUF LoRA for llama.cpp / Ollama /
LM Studio, an Ollama model folder (Modelfile + GGUF LoRA), a PEFT adapter for Hugging Face tools, or the base with
the adapter merged in exactly."""
import argparse
import sys


def parser():
    from .io.formats import FORMATS
    p = argparse.ArgumentParser(prog="python -m mesp_mlx.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--adapter-path", default="adapters", help="adapter folder (adapters.safetensors + "
                   "adapter_config.json); default: adapters")
    # checked by export_adapter, not argparse's choices: a wrong name is then a one-line error like every other
    p.add_argument("--format", default="mlx-lm", help=" | ".join(FORMATS) + " (default: mlx-lm)")
    p.add_argument("-o", "--out", help="output file (gguf) or folder; default: inside the adapter folder")
    p.add_argument("--model", help="the base model (default: the one named in adapter_config.json)")
    p.add_argument("--dtype", default="float16", help="fused: float16 (default) | bfloat16 | float32")
    p.add_argument("--quantize", action="store_true", help="fused: re-quantize the merged weights")
    p.add_argument("--q-bits", type=int, default=4)
    p.add_argument("--q-group-size", type=int, default=64)
    return p


def main(argv=None):
    from .blas import ensure_fast_blas
    from .console import quiet_transformers
    ensure_fast_blas()
    quiet_transformers()
    from .errors import MespError
    from .io.formats import export_adapter
    a = parser().parse_args(argv)
    try:
        quantize = (a.q_group_size, a.q_bits) if a.quantize else None
        out, lines = export_adapter(a.adapter_path, a.format, a.out, a.model, a.dtype, quantize)
    except (MespError, ValueError) as e:  # mx.quantize's own errors (bad bits / group) are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    for line in lines:
        print(line)
    print(f"wrote {a.format} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
