"""An Ollama model folder: a Modelfile and the GGUF LoRA (gguf_lora's file), so `ollama create NAME -f Modelfile`
takes the adapter in one command. The Modelfile says FROM the GGUF file the store was converted from (the adapter
was trained on exactly its weights: Ollama must load the same file), ADAPTER the LoRA beside it, the chat TEMPLATE
in Ollama's Go-template form of the model's own chat format, the template's default system prompt as SYSTEM (SmolLM2
renders one when a conversation has none, and so every row was trained with it), and each stop token of the family
that the vocabulary has as PARAMETER stop.

The TEMPLATE is chosen by the chat format the model's Jinja template writes (its markers), from DIALECTS: ChatML
(SmolLM2, SmolLM3, Qwen2/2.5/3), Llama 3 and Phi-3. Ollama passes every message, system ones included, in
`.Messages`, so one range over them renders a conversation; a model of another format (Gemma, Mistral) gets no
TEMPLATE line and Ollama picks the template from the GGUF's own tokenizer.chat_template, which a line printed says.
"""
import re
from pathlib import Path

from ...models import stop_ids
from .. import SourceError
from . import gguf_lora
from .common import store_source

DEFAULT_OUT = "ollama"
ADAPTER_FILE = gguf_lora.DEFAULT_OUT
PROBE = "\x00probe\x00"  # a user message no template writes by itself: what surrounds it is the template's own

# name -> (a marker of the format in its Jinja template, Ollama's TEMPLATE, the default system prompt in a one-turn
# rendering (group 1))
DIALECTS = {
    "chatml": ("<|im_start|>",
               "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
               "<|im_start|>assistant\n",
               re.compile(r"<\|im_start\|>system\n(.*?)<\|im_end\|>\n<\|im_start\|>user\n", re.DOTALL)),
    "llama3": ("<|start_header_id|>",
               "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
               "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
               re.compile(r"<\|start_header_id\|>system<\|end_header_id\|>\n\n(.*?)<\|eot_id\|>", re.DOTALL)),
    "phi3": ("<|assistant|>",
             "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n",
             re.compile(r"<\|system\|>\n(.*?)<\|end\|>\n<\|user\|>\n", re.DOTALL)),
}


def export(adapter_dir, params, lora, store, out, **_):
    source = Path(store_source(store))
    if store.info.get("kind") != "gguf" or not source.is_file():
        raise SourceError(f"{adapter_dir}: trained on {source}, which is not a GGUF file: Ollama's FROM must be the "
                          "GGUF the adapter was trained on. Train on a GGUF of the model (--model file.gguf), or "
                          "export --format fused and import that folder into Ollama")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    scale_line = gguf_lora.export(adapter_dir, params, lora, store, out / ADAPTER_FILE)
    tokenizer = store.tokenizer()
    dialect = dialect_of(getattr(tokenizer, "chat_template", None))
    text = modelfile(source.resolve(), ADAPTER_FILE, dialect, default_system(tokenizer, dialect),
                     stop_tokens(tokenizer, store.args.model_type))
    (out / "Modelfile").write_text(text, encoding="utf-8")
    notes = [f"ollama: `ollama create NAME -f Modelfile` in that folder (FROM {source}); {scale_line}"]
    if dialect is None:
        notes.append("ollama: no TEMPLATE written (the model's chat format is not one of "
                     f"{', '.join(DIALECTS)}): Ollama takes it from the GGUF's tokenizer.chat_template")
    if store.info.get("requantized_rel_l2") is not None:
        notes.append("ollama: the adapter was trained on the file's weights re-quantized (--requantize); Ollama runs "
                     "it on the file's own, which differ by the error printed at conversion")
    return "\n".join(notes)


def dialect_of(template):
    """The DIALECTS name of a Jinja chat template, or None."""
    return next((name for name, (marker, _, _) in DIALECTS.items() if template and marker in template), None)


def default_system(tokenizer, dialect):
    """The system prompt the model's template writes into a conversation that has none, or None."""
    if dialect is None:
        return None
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": PROBE}], tokenize=False,
                                             add_generation_prompt=True)
    except Exception:  # a template that cannot render one user turn has no default to find
        return None
    m = DIALECTS[dialect][2].search(text.split(PROBE)[0])
    return m.group(1) if m else None


def stop_tokens(tokenizer, model_type):
    """The family's end-of-turn tokens and eos, as text, in this vocabulary (by id)."""
    return [tokenizer.convert_ids_to_tokens(i) for i in sorted(stop_ids(tokenizer, model_type))]


def modelfile(base, adapter, dialect, system, stops):
    """The Modelfile text. Values that hold a newline or a quote are written in triple quotes (Ollama's syntax); a
    value with three quotes in a row cannot be written and is refused."""
    lines = ["# Ollama model: the base GGUF and the LoRA trained on it with mesp-mlx.",
             "# ollama create NAME -f Modelfile   (run where this file is, or give its path)",
             f"FROM {_path(base)}", f"ADAPTER {_path(adapter)}"]
    if dialect is not None:
        lines.append(f"TEMPLATE {_quote(DIALECTS[dialect][1])}")
    if system:
        lines.append(f"SYSTEM {_quote(system)}")
    lines += [f"PARAMETER stop {_quote(s, always=True)}" for s in stops]
    return "\n".join(lines) + "\n"


def _path(p):
    p = str(p)
    if p != p.strip() or "\n" in p or '"' in p:
        raise SourceError(f"{p}: a path Ollama's Modelfile cannot name (leading or trailing space, a newline or a "
                          "quote)")
    return p if Path(p).is_absolute() else f"./{p}"


def _quote(value, always=False):
    if '"""' in value:
        raise SourceError(f"a Modelfile value with three quotes in a row cannot be written: {value[:40]!r}")
    if "\n" in value or '"' in value or value != value.strip():
        return f'"""{value}"""'
    return f'"{value}"' if always else value
