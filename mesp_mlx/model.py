"""The plain forward of a whole model over a weight store: logits, a greedy reply, and the reference loss that MLX
autodiff differentiates (engines/autodiff.py). The training engines reuse the same block and head pieces.
"""
import mlx.core as mx

from .data import token_ids
from .models import stop_ids
from .ops.block import block_dropout, block_forward, packing
from .ops.linear import DEFAULT, accum_dtype, frozen_matmul
from .ops.loss import token_nll_forward
from .ops.rmsnorm import rmsnorm_forward
from .sampler import Generator, Sampling


def hidden_states(store, ids, lora=None, scale=20.0, specs=None, layers=None, dropout=None, segments=None):
    """Final hidden state (before the final norm). specs: one BlockSpec per block (`args.block_specs(compute)`);
    `layers`: pre-loaded block weights (else streamed); dropout: a training step's LoRA dropout (p, seed);
    segments: (B, T) packed-row ids of a packed batch (None: one row per batch row)."""
    specs = specs or store.args.block_specs()
    lora = lora or {}
    packed = packing(segments)
    x = store.embed(ids, specs[0].compute.dtype)
    for i in range(store.num_layers):
        w = layers[i] if layers is not None else store.layer(i)
        x = block_forward(x, w, lora.get(i, {}), scale, specs[i], dropout=block_dropout(dropout, i), **packed)
        if layers is None:
            mx.eval(x)
    return x


def head_logits(store, x, compute=DEFAULT):
    """Final norm and LM head over the whole sequence: B x T x V logits."""
    a = store.args
    return frozen_matmul(rmsnorm_forward(x, store.final_norm(), a.rms_norm_eps, a.norm_offset), store.head(), compute)


def logits(store, ids, lora=None, scale=20.0, specs=None, layers=None):
    specs = specs or store.args.block_specs()
    return head_logits(store, hidden_states(store, ids, lora, scale, specs, layers), specs[0].compute)


def full_token_nll(store, x, targets, compute=DEFAULT):
    """Every token's negative log-likelihood of its target (B, T), unmasked, from the final hidden state, written
    the obvious way (full logits)."""
    z = head_logits(store, x, compute)
    z = z.astype(accum_dtype(z.dtype))
    return mx.logsumexp(z, axis=-1) - mx.take_along_axis(z, targets[..., None], axis=-1)[..., 0]


def reference_loss(store, batch, lora, scale, specs=None, layers=None, dropout=None):
    """A batch's (loss, stats) under its objective, as one plain graph."""
    specs = specs or store.args.block_specs()
    x = hidden_states(store, batch.inputs, lora, scale, specs, layers, dropout, batch.segments)
    stats = batch.objective.loss_stats(full_token_nll(store, x, batch.targets, specs[0].compute), batch)
    return stats["loss"], stats


def token_logps(store, inputs, targets, lora=None, scale=20.0, compute=DEFAULT):
    """Every token's log-probability of its target (B, T) under the model, a forward only: the blocks streamed,
    the head read in vocabulary chunks."""
    a, specs = store.args, store.args.block_specs(compute)
    x = hidden_states(store, inputs, lora, scale, specs)
    h = rmsnorm_forward(x, store.final_norm(), a.rms_norm_eps, a.norm_offset).reshape(-1, x.shape[-1])
    nll, _ = token_nll_forward(h, store.head_rows(), targets.reshape(-1), compute)
    out = -nll.reshape(targets.shape)
    mx.eval(out)
    return out


def prompt_ids(tokenizer, prompt, chat=True):
    """The ids a reply to `prompt` follows: one user turn through the chat template (with the generation prompt)
    when chat and the tokenizer has one, else the prompt's plain encoding."""
    if chat and getattr(tokenizer, "chat_template", None):
        return token_ids(tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                       add_generation_prompt=True, tokenize=True))
    return list(tokenizer.encode(prompt))


def generate(generator, tokenizer, prompt, max_tokens=32, lora=None, scale=20.0, chat=True):
    """The greedy reply to one prompt, up to the family's stop ids, from a `sampler.Generator` (or a store: its
    generator with the default settings)."""
    generator = generator if isinstance(generator, Generator) else Generator(generator)
    out = generator.generate([prompt_ids(tokenizer, prompt, chat)], lora, scale, Sampling(max_tokens),
                             stop_ids(tokenizer, generator.store.args.model_type))
    return tokenizer.decode(out[0].tokens)
