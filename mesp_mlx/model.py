"""The plain forward of a whole model over a weight store: logits, greedy generation, and the reference loss that
MLX autodiff differentiates (engines/autodiff.py). The training engines reuse the same block and head pieces.
"""
import mlx.core as mx

from .data import token_ids
from .models import stop_ids
from .ops.block import block_dropout, block_forward, packing
from .ops.linear import DEFAULT, accum_dtype, frozen_matmul, prepared
from .ops.rmsnorm import rmsnorm_forward


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


def prompt_ids(tokenizer, prompt, chat=True):
    """The ids a reply to `prompt` follows: one user turn through the chat template (with the generation prompt)
    when chat and the tokenizer has one, else the prompt's plain encoding."""
    if chat and getattr(tokenizer, "chat_template", None):
        return token_ids(tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                       add_generation_prompt=True, tokenize=True))
    return list(tokenizer.encode(prompt))


def generate(store, tokenizer, prompt, max_tokens=32, lora=None, scale=20.0, chat=True, compute=DEFAULT):
    """Greedy decoding (no KV cache: each step recomputes the prefix, fine for short answers). Blocks are streamed
    and the head read in vocabulary chunks, as in training, so a sample stays within a run's memory budget."""
    ids, out = prompt_ids(tokenizer, prompt, chat), []
    stops = stop_ids(tokenizer, store.args.model_type)  # the ids a fused export's generation_config lists
    specs = store.args.block_specs(compute)
    for _ in range(max_tokens):
        nxt = next_token(store, mx.array([ids]), lora, scale, specs)
        if nxt in stops:
            break
        ids.append(nxt)
        out.append(nxt)
    return tokenizer.decode(out)


def next_token(store, ids, lora, scale, specs):
    """The greedy next token after ids (1, T)."""
    return next_tokens(store, ids, [ids.shape[1]], lora, scale, specs)[0]


def next_tokens(store, ids, lengths, lora, scale, specs):
    """The greedy next token of each row of ids (B, T), right-padded, after its first lengths[r] tokens (attention
    is causal: what follows a row's end changes nothing before it), from that position's logits a vocabulary chunk
    at a time (the first of equal maxima wins, as argmax's). One pass of the weights serves every row."""
    a, compute = store.args, specs[0].compute
    x = hidden_states(store, ids, lora, scale, specs)
    x = x[mx.arange(x.shape[0]), mx.array(lengths) - 1]
    h = rmsnorm_forward(x, store.final_norm(), a.rms_norm_eps, a.norm_offset)
    head = store.head_rows()
    best, arg = mx.full((h.shape[0],), -float("inf")), mx.zeros((h.shape[0],), mx.int32)
    chunk = compute.head_tile(h.shape[0], head, h.shape[-1])[1]
    for v0 in range(0, head.out_dims, chunk):
        z = frozen_matmul(h, prepared(head.rows(v0, min(v0 + chunk, head.out_dims)), compute), compute)
        k = mx.argmax(z, axis=-1)
        v = mx.take_along_axis(z, k[:, None], axis=-1)[:, 0].astype(best.dtype)
        better = v > best
        arg, best = mx.where(better, k.astype(mx.int32) + v0, arg), mx.where(better, v, best)
        mx.eval(arg, best)
    return arg.tolist()
