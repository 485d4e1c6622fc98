"""Conformance matrix (issue 25): every family x source (Hugging Face directory, GGUF) x format, each checked in the
tool that reads it.

- gguf: llama.cpp itself (its Python bindings, in a subprocess: a LoRA it refuses crashes the next eval) loads the
  F32 base GGUF with the exported LoRA; the adapter's effect on its logits (adapted - base) must equal ours, so a
  wrong q/k permutation, name or scale fails, not only a refused file.
- peft: PEFT's formula W + (lora_alpha / r) B A in numpy on the Hugging Face weights, merged and loaded as a plain
  model, gives our adapted logits.
- mlx-lm: mlx-lm loads the store with the adapter folder.
- fused: mlx-lm loads the folder; config.json and generation_config.json carry what transformers and llama.cpp's
  convert_hf_to_gguf.py read (checked without transformers).

The tiny models are the suite's, with the settings llama.cpp fixes rather than reads (Gemma 3: five sliding layers in
six, 1/sqrt(head_dim) scores, and six layers, which mlx-lm's Gemma 3 needs; SmolLM3: every fourth layer without
RoPE; Mistral: no window, as llama.cpp's `llama` has none; Qwen3.5: builders.tiny_qwen35, Hk = 2 < Hv = 4, so
llama.cpp's value-head reorder is exercised in every format), so that the directory, the GGUF and llama.cpp describe
one model; Gemma's d = 64 makes sqrt(d) a bf16 number (llama.cpp scales embeddings in fp32, mlx-lm in bf16).

Tolerances. Ours and the readers compute in fp32 on the CPU, the same sums in another order: EXACT (helpers.py) for
logits. The effect in llama.cpp is a difference of two runs of ~1e-6 relative error each, measured on effects that are
of the order of the logits: LLAMACPP_TOL = 1e-4. Gemma 3 in llama.cpp goes through GELU's fp16 table (each input
rounded to 11 significant bits, 2^-11 = 4.9e-4 relative): measured 3.9e-4 on the logits, so 5e-3 on the effect,
still ~100x below what a wrong permutation or scale gives (O(1)).
"""
import json
import subprocess
from dataclasses import replace
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from builders import write_tiny, write_tiny_gguf
from helpers import EXACT, mlx_lm_model, rel_err
from mesp_mlx.io.adapters import save_adapter
from mesp_mlx.io.formats import FORMATS, export_adapter, load_adapter_weights
from mesp_mlx.io.sources import load_model
from mesp_mlx.lora import LoRAConfig, init_lora, to_flat
from mesp_mlx.model import logits
from mesp_mlx.models import family

FAMILIES = ["llama", "mistral", "smollm3", "qwen2", "qwen3", "phi3", "gemma3_text", "qwen3_5"]
PENDING = []  # families the suite builds that the matrix does not cover yet
SOURCES = ["hf", "gguf"]
LORA = LoRAConfig(rank=4, scale=2.5)
IDS = [5, 17, 42, 99, 3, 250, 7, 8]
SAME_IN_LLAMACPP = {
    "gemma3_text": dict(hidden_size=64, num_hidden_layers=6, sliding_window_pattern=6, sliding_window=64,
                        query_pre_attn_scalar=16, rope_scaling=None),
    "smollm3": dict(num_hidden_layers=4, no_rope_layers=[1, 1, 1, 0]),
    "mistral": dict(sliding_window=None, layer_types=None),
}
# Gemma's turn end first (id 0), as its own vocabulary has it among the specials; bos 1, eos 2
SPECIALS = {"gemma3_text": ("<end_of_turn>", "<bos>", "<eos>")}
# the stop ids of each family's fused folder in these vocabularies (ChatML: <|endoftext|> 0, <|im_end|> 2 = eos)
STOPS = {"llama": [0, 2], "mistral": [2], "smollm3": [2], "qwen2": [0, 2], "qwen3": [0, 2], "phi3": [0, 2],
         "gemma3_text": [0, 2], "qwen3_5": [2]}
LLAMACPP_TOL, LLAMACPP_GEMMA_TOL = 1e-4, 5e-3


def random_params(store, seed):
    """All projections of every block with a nonzero B (init_lora's B is zero, which would test nothing)."""
    params = init_lora(store.args, replace(LORA, keys=store.args.projections()), seed)
    rng = np.random.default_rng(seed)
    return {i: {p: (a, mx.array(rng.normal(0, 0.05, b.shape).astype(np.float32))) for p, (a, b) in mods.items()}
            for i, mods in params.items()}


def write_base(root, arch):
    """The family's tiny model as an F32 GGUF (llama.cpp's layout) and as a Hugging Face directory with the same
    weights and the GGUF's tokenizer; returns (gguf file, directory, config, Hugging Face weights)."""
    root.mkdir(parents=True, exist_ok=True)
    gemma = arch == "gemma3_text"
    config, weights = write_tiny_gguf(root / "base.gguf", arch, "F32", pre="default",
                                      specials=SPECIALS.get(arch, ("<|endoftext|>", "<|im_start|>", "<|im_end|>")),
                                      bos=1 if gemma else 0, **SAME_IN_LLAMACPP.get(arch, {}))
    hf = root / "hf"
    hf.mkdir(exist_ok=True)
    (hf / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    mx.save_safetensors(str(hf / "model.safetensors"), {k: mx.array(v) for k, v in weights.items()})
    tokenizer_store = load_model(str(root / "base.gguf"), quantize=None)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (hf / name).write_bytes((tokenizer_store.path / name).read_bytes())
    return root / "base.gguf", hf, config, weights


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """case(arch, source) -> dict: the store (converted dense, so it is exactly its source), random parameters and
    their adapter folder; built once per module."""
    root, built, bases = tmp_path_factory.mktemp("conformance"), {}, {}

    def get(arch, source):
        if arch not in bases:
            bases[arch] = write_base(root / arch, arch)
        if (arch, source) not in built:
            gguf_file, hf, config, weights = bases[arch]
            store = load_model(str(gguf_file if source == "gguf" else hf), quantize=None)
            params = random_params(store, seed=3)
            ad = root / arch / f"adapter-{source}"
            save_adapter(ad, params, replace(LORA, keys=store.args.projections()), store.path)
            built[arch, source] = dict(store=store, params=params, adapter=ad, gguf=gguf_file, hf=hf, config=config,
                                       weights=weights, root=root / arch)
        return built[arch, source]
    return get


def ours(c, adapted=True):
    return np.array(logits(c["store"], mx.array([IDS]), c["params"] if adapted else None, LORA.scale))[0]


def expected_shapes(params):
    return {k: tuple(v.shape) for k, v in to_flat(params).items()}


def assert_round_trip(path, c):
    back = to_flat(load_adapter_weights(path, expected_shapes(c["params"]), LORA.scale, store=c["store"]))
    for name, arr in to_flat(c["params"]).items():
        assert np.array_equal(np.array(back[name]), np.array(arr)), name


LLAMACPP = """
import sys, json
import numpy as np
from llama_cpp import GGML_TYPE_F32, Llama
base, lora, out, ids = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
runs = {}
for name, path in (("base", None), ("lora", lora)):
    llm = Llama(model_path=base, lora_path=path, n_ctx=256, logits_all=True, type_k=GGML_TYPE_F32,
                type_v=GGML_TYPE_F32, n_threads=1, verbose=False)
    llm.eval(ids)
    runs[name] = np.array(llm.scores[:len(ids)], dtype=np.float64)
np.savez(out, **runs)
"""


def llamacpp_logits(base, lora, out):
    """(base logits, adapted logits) of llama.cpp on IDS, F32 KV cache, in a subprocess."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError as e:
        pytest.skip(f"llama.cpp's bindings cannot be imported ({e}); install them with "
                    ".venv/bin/pip install llama-cpp-python")
    run = subprocess.run([sys.executable, "-c", LLAMACPP, str(base), str(lora), str(out), json.dumps(IDS)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"llama.cpp failed (rc {run.returncode}): {run.stderr[-600:]}"
    got = np.load(out)
    return got["base"], got["lora"]


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("arch", FAMILIES)
def test_gguf_lora_in_llamacpp(case, arch, source):
    import gguf
    c = case(arch, source)
    out = c["root"] / f"lora-{source}.gguf"
    export_adapter(c["adapter"], "gguf", out)
    arch_of = lambda f: gguf.GGUFReader(str(f)).fields["general.architecture"].contents()
    assert arch_of(out) == arch_of(c["gguf"]) == family(arch).llamacpp_arch
    assert_round_trip(out, c)
    base, adapted = llamacpp_logits(c["gguf"], out, c["root"] / f"llamacpp-{source}.npz")
    ref_base, ref = ours(c, adapted=False), ours(c)
    assert rel_err(mx.array(base), mx.array(ref_base)) <= (LLAMACPP_GEMMA_TOL if arch == "gemma3_text" else EXACT)
    effect, ref_effect = mx.array(adapted - base), mx.array(ref - ref_base)
    assert float(mx.max(mx.abs(ref_effect))) > 0.05 * float(np.max(np.abs(ref)))  # the adapter does something
    err = rel_err(effect, ref_effect)
    assert err <= (LLAMACPP_GEMMA_TOL if arch == "gemma3_text" else LLAMACPP_TOL), err


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("arch", FAMILIES)
def test_peft_formula_on_hf_weights(case, arch, source, tmp_path):
    from safetensors.numpy import load_file
    c = case(arch, source)
    out = c["root"] / f"peft-{source}"
    export_adapter(c["adapter"], "peft", out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(c["hf"] if source == "hf" else c["gguf"].parent)
    assert_round_trip(out, c)
    s = cfg["lora_alpha"] / cfg["r"]
    merged = dict(c["weights"])
    for name, A in load_file(str(out / "adapter_model.safetensors")).items():
        if ".lora_A." in name:
            module = name.removeprefix("base_model.model.").replace(".lora_A.weight", "")
            B = load_file(str(out / "adapter_model.safetensors"))[name.replace("lora_A", "lora_B")]
            merged[f"{module}.weight"] = merged[f"{module}.weight"] + s * (B @ A)
    d = tmp_path / "merged"
    d.mkdir()
    (d / "config.json").write_text((c["hf"] / "config.json").read_text())
    mx.save_safetensors(str(d / "model.safetensors"), {k: mx.array(v) for k, v in merged.items()})
    got = logits(load_model(str(d), quantize=None), mx.array([IDS]))[0]
    assert rel_err(got, mx.array(ours(c))) <= EXACT


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("arch", FAMILIES)
def test_mlx_lm_folder_in_mlx_lm(case, arch, source):
    c = case(arch, source)
    out, _ = export_adapter(c["adapter"], "mlx-lm", c["root"] / f"mlx-lm-{source}")
    assert_round_trip(out / "adapters.safetensors", c)
    got = mlx_lm_model(c["store"].path, out)(mx.array([IDS]))[0]
    assert rel_err(got, mx.array(ours(c))) <= EXACT


# what transformers' AutoConfig and convert_hf_to_gguf.py read from every config.json
READ_KEYS = ("architectures", "model_type", "hidden_size", "num_hidden_layers", "intermediate_size",
             "num_attention_heads", "num_key_value_heads", "vocab_size", "rms_norm_eps", "bos_token_id",
             "eos_token_id", "torch_dtype", "tie_word_embeddings")


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("arch", FAMILIES)
def test_fused_folder_every_reader_takes(case, arch, source):
    from mlx_lm import load
    c = case(arch, source)
    out, _ = export_adapter(c["adapter"], "fused", c["root"] / f"fused-{source}", dtype="float32")
    cfg = json.loads((out / "config.json").read_text())
    gen = json.loads((out / "generation_config.json").read_text())
    assert [k for k in READ_KEYS if k not in cfg] == []
    assert cfg["architectures"] == [family(cfg["model_type"]).hf_architecture]
    assert not cfg.get("rope_traditional")
    gemma = arch == "gemma3_text"
    stops = STOPS[c["store"].args.model_type]  # a Mistral GGUF is a llama to llama.cpp, and to us
    assert cfg["bos_token_id"] == gen["bos_token_id"] == (1 if gemma else 0)
    assert sorted(np.atleast_1d(gen["eos_token_id"])) == sorted(np.atleast_1d(cfg["eos_token_id"])) == stops
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert all((out / f).exists() for f in set(index.values())) and (out / "tokenizer.json").exists()
    model, tokenizer = load(str(out))
    assert sorted(tokenizer.eos_token_ids) == stops  # mlx-lm stops where we do
    assert rel_err(model(mx.array([IDS]))[0], mx.array(ours(c))) <= EXACT


def test_peft_names_the_hub_id_of_a_downloaded_base(tmp_path):
    """A base downloaded from the hub (its snapshot folder in the hub's cache layout) is named by its id."""
    snapshot = write_tiny(tmp_path / "hub" / "models--org--tiny-llama" / "snapshots" / "0123abc", "llama")
    store = load_model(str(snapshot), quantize=None)
    save_adapter(tmp_path / "ad", random_params(store, 1), LORA, store.path)
    out, _ = export_adapter(tmp_path / "ad", "peft", tmp_path / "peft")
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/tiny-llama"
    assert 'from_pretrained("org/tiny-llama")' in (out / "README.md").read_text()


def test_every_family_record_is_whole():
    """Every registered family names every projection a LoRA adapts in llama.cpp's naming (a missing one was Phi-3's
    KeyError), a llama.cpp architecture that reads its GGUFs back as a family, and a transformers class."""
    from builders import TINY
    from mesp_mlx.models import ARCHITECTURES, GGUF_ARCHITECTURES, model_args
    assert sorted(TINY) == sorted(FAMILIES + PENDING)  # the matrix covers every family the suite builds
    for kind in ARCHITECTURES:
        fam = family(kind)
        args = model_args(TINY.get(kind) or TINY[fam.model_type])
        assert set(args.projections()) <= set(fam.hf_to_gguf()), kind
        # a family whose GGUF bases are not read would still name llama.cpp's tensors for its LoRAs; a
        # multimodal checkpoint's class is its ForConditionalGeneration
        assert fam.llamacpp_arch in GGUF_ARCHITECTURES or not fam.reads_gguf, kind
        assert fam.hf_architecture.endswith(("ForCausalLM", "ForConditionalGeneration")), kind


def test_gguf_lora_for_another_architecture_is_refused(case):
    """As llama.cpp refuses it: one line naming both architectures."""
    from mesp_mlx.io import SourceError
    gemma, llama = case("gemma3_text", "gguf"), case("llama", "hf")
    out = gemma["root"] / "lora-gguf.gguf"
    export_adapter(gemma["adapter"], "gguf", out)
    with pytest.raises(SourceError, match="a LoRA for a gemma3 model, not for this llama model") as e:
        load_adapter_weights(out, expected_shapes(llama["params"]), store=llama["store"])
    assert "\n" not in str(e.value)


def test_formats_table_feeds_the_cli():
    from mesp_mlx.export import parser
    fmt = next(a for a in parser()._actions if a.dest == "format")
    out = next(a for a in parser()._actions if a.dest == "out")
    assert all(name in fmt.help for name in FORMATS) and "-o" in out.option_strings


def test_sampling_stops_on_the_family_turn_end(case, tmp_path):
    """Gemma's <end_of_turn> (id 0 here, not its eos) ends our greedy decoding, as it ends mlx-lm's on the fused
    folder. The final norm's multiplier 1 + w is set to 0, so every logit is 0 and argmax picks id 0."""
    from mesp_mlx.io.tokenizer import load_tokenizer
    from mesp_mlx.model import generate
    c = case("gemma3_text", "hf")
    d = tmp_path / "silent"
    d.mkdir()
    for f in c["hf"].iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    weights = dict(c["weights"], **{"model.norm.weight": -np.ones(c["config"]["hidden_size"], np.float32)})
    mx.save_safetensors(str(d / "model.safetensors"), {k: mx.array(v) for k, v in weights.items()})
    store = load_model(str(d), quantize=None)
    tok = load_tokenizer(store.path)
    assert tok.eos_token_id == 2 and tok.convert_tokens_to_ids("<end_of_turn>") == 0
    assert generate(store, tok, "the fox", max_tokens=3, chat=False) == ""


def test_gemma3_text_head_comes_from_the_weights(tmp_path):
    """A gemma3_text checkpoint with an lm_head.weight (and no tie_word_embeddings in its config) uses that head, as
    mlx-lm does."""
    from builders import TINY, tiny_weights
    config = dict(TINY["gemma3_text"])
    weights = tiny_weights(config)
    weights["lm_head.weight"] = mx.array(np.random.default_rng(7).normal(0, 0.08, weights["model.embed_tokens.weight"]
                                                                         .shape).astype(np.float32))
    d = tmp_path / "gemma-head"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    mx.save_safetensors(str(d / "model.safetensors"), weights)
    store = load_model(str(d), quantize=None)
    assert not store.args.tie_word_embeddings
    ids = mx.array([[5, 17, 42, 99, 3, 150, 7, 8]])  # the vocabulary has 190 tokens
    assert rel_err(logits(store, ids), mlx_lm_model(d)(ids)) <= EXACT


def test_chatml_mistral_stops_on_im_end(case):
    """A ChatML fine-tune of a Mistral keeps model_type mistral and eos </s> (or another id): its turns end with
    <|im_end|>, which our sampling and the fused export's stop list must include."""
    from mesp_mlx.io.tokenizer import load_tokenizer
    from mesp_mlx.models import stop_ids
    c = case("mistral", "hf")
    tok = load_tokenizer(load_model(str(c["hf"]), quantize=None).path)
    tok.eos_token = "<|endoftext|>"  # the tiny vocabulary's eos is <|im_end|> itself: give it another, as Mistral's
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end != tok.eos_token_id and im_end in stop_ids(tok, "mistral")
