#!/usr/bin/env python3
"""Tiny random Hugging Face model folders with reference logits, for the runtime's numerics tests.

    pip install numpy tokenizers
    python3 scripts/make-fixtures.py runtime/tests/fixtures
    python3 scripts/make-fixtures.py --check runtime/tests/fixtures   # against transformers (torch)

writes one folder per model type (gpt2, llama, qwen2, mistral), each a Hugging Face model
folder as `save_pretrained` lays it out:

    config.json              the model's config (transformers' field names)
    model.safetensors        or model-0000N-of-0000M.safetensors + model.safetensors.index.json
    tokenizer.json           a byte-level BPE tokenizer trained here on a small corpus
    reference.json           prompt, its ids, greedy tokens and the logits of every step

The models are small (2 layers, hidden 64, grouped-query attention where the family has it) with
seeded random weights, stored as f32 (gpt2, llama), f16 in two shards (qwen2) and bf16 (mistral),
so the loader's conversions and shard index are exercised. Each folder is well under 1 MB.

Reference logits: `transformers` needs `torch` to run a model, and the only torch on PyPI for
Linux is the CUDA build with several GB of dependencies, which CI must not install. So the
logits come from the numpy implementation below of `transformers`' forward passes
(`GPT2LMHeadModel`, `LlamaForCausalLM` / `Qwen2ForCausalLM` / `MistralForCausalLM`: RMSNorm,
rotate-half rotary embeddings with linear and llama3 scaling, grouped-query attention via
repeat_kv, SiLU-gated MLP, tied or untied head), in float64 on the weights as stored (converted
to float64 from their f16/bf16/f32 bits). With torch at hand, the same folders load in
`transformers` (`AutoModelForCausalLM.from_pretrained(dir, torch_dtype=torch.float32)`) and its
logits agree with these to float32 rounding; the script checks that when torch is importable
(every step's logits within 1e-4, and transformers' own greedy `generate` gives the reference
tokens), and `--check` checks the committed folders without rewriting them.

The greedy tokens are recomputed by full forward passes over the growing sequence (no KV cache),
so the runtime's cached decode steps are checked against an independent path.
"""

import json
import os
import struct
import sys

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

CORPUS = [
    "Genie moves tensors between workers over RDMA and TCP.",
    "The scheduler knows what a model's tensors mean: weights, caches, activations.",
    "Prefill runs on one worker; decode runs on another, where the KV cache is pinned.",
    "A small language model predicts the next token from the tokens before it.",
    "Rotary position embeddings rotate pairs of query and key features by their position.",
    "Grouped-query attention shares each key and value head among several query heads.",
    "The quick brown fox jumps over the lazy dog. Hello, world! 0123456789",
]
PROMPT = "The scheduler moves the cache"
STEPS = 6
VOCAB = 384


def tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    return tok


def bf16_bits(a):
    """float32 array -> bfloat16 bits (round to nearest even) as uint16."""
    b = a.astype(np.float32).view(np.uint32)
    rounded = b + 0x7FFF + ((b >> 16) & 1)
    return (rounded >> 16).astype(np.uint16)


def store(arr, dtype):
    """(safetensors dtype, bytes, the values as float64 after the round trip)."""
    if dtype == "F32":
        a = arr.astype("<f4")
        return a.tobytes(), a.astype(np.float64)
    if dtype == "F16":
        a = arr.astype("<f2")
        return a.tobytes(), a.astype(np.float64)
    if dtype == "BF16":
        bits = bf16_bits(arr)
        back = (bits.astype(np.uint32) << 16).view(np.float32)
        return bits.astype("<u2").tobytes(), back.astype(np.float64)
    raise ValueError(dtype)


def write_safetensors(path, tensors, dtype):
    header, blobs, off, values = {}, [], 0, {}
    for name in sorted(tensors):
        raw, back = store(tensors[name], dtype)
        header[name] = {"dtype": dtype, "shape": list(tensors[name].shape),
                        "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
        values[name] = back
    header["__metadata__"] = {"format": "pt"}
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)
    return values


def save(folder, tensors, dtype, shards):
    if shards == 1:
        return write_safetensors(os.path.join(folder, "model.safetensors"), tensors, dtype)
    names = sorted(tensors)
    per = (len(names) + shards - 1) // shards
    values, weight_map = {}, {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i * per:(i + 1) * per]}
        values.update(write_safetensors(os.path.join(folder, fname), part, dtype))
        weight_map.update({n: fname for n in part})
    total = sum(t.size * (2 if dtype != "F32" else 4) for t in tensors.values())
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return values


# ---------------------------------------------------------------- numpy forward passes (float64)

def softmax(x):
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def causal_attention(q, k, v):
    """q [H, S, D], k/v [H, S, D] -> [S, H*D]."""
    h, s, d = q.shape
    scores = q @ k.transpose(0, 2, 1) / np.sqrt(d)
    scores = scores + np.triu(np.full((s, s), -np.inf), 1)
    return (softmax(scores) @ v).transpose(1, 0, 2).reshape(s, h * d)


def gpt2_forward(w, c, ids):
    s = len(ids)
    nh, d = c["n_head"], c["n_embd"]
    hd = d // nh

    def ln(x, p):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + c["layer_norm_epsilon"]) * w[p + ".weight"] + w[p + ".bias"]

    def gelu_new(x):
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))

    h = w["wte.weight"][ids] + w["wpe.weight"][np.arange(s)]
    for i in range(c["n_layer"]):
        p = f"h.{i}"
        x = ln(h, p + ".ln_1")
        qkv = x @ w[p + ".attn.c_attn.weight"] + w[p + ".attn.c_attn.bias"]
        q, k, v = (qkv[:, j * d:(j + 1) * d].reshape(s, nh, hd).transpose(1, 0, 2) for j in range(3))
        a = causal_attention(q, k, v)
        h = h + a @ w[p + ".attn.c_proj.weight"] + w[p + ".attn.c_proj.bias"]
        x = ln(h, p + ".ln_2")
        m = gelu_new(x @ w[p + ".mlp.c_fc.weight"] + w[p + ".mlp.c_fc.bias"])
        h = h + m @ w[p + ".mlp.c_proj.weight"] + w[p + ".mlp.c_proj.bias"]
    return ln(h, "ln_f") @ w["wte.weight"].T


def inv_freq(c, d):
    f = 1.0 / (c.get("rope_theta", 10000.0) ** (np.arange(0, d, 2, dtype=np.float64) / d))
    rs = c.get("rope_scaling")
    if not rs:
        return f
    kind = rs.get("rope_type", rs.get("type"))
    if kind == "linear":
        return f / rs["factor"]
    if kind == "llama3":
        old = rs["original_max_position_embeddings"]
        low_wl, high_wl = old / rs["low_freq_factor"], old / rs["high_freq_factor"]
        wl = 2 * np.pi / f
        scaled = np.where(wl > low_wl, f / rs["factor"], f)
        smooth = (old / wl - rs["low_freq_factor"]) / (rs["high_freq_factor"] - rs["low_freq_factor"])
        smoothed = (1 - smooth) * scaled / rs["factor"] + smooth * scaled
        medium = ~(wl < high_wl) & ~(wl > low_wl)
        return np.where(medium, smoothed, scaled)
    raise ValueError(kind)


def llama_forward(w, c, ids):
    s = len(ids)
    d, nh = c["hidden_size"], c["num_attention_heads"]
    g = c["num_key_value_heads"]
    hd = c.get("head_dim") or d // nh
    qkv_bias = c["model_type"] == "qwen2" or c.get("attention_bias", False)

    def rms(x, p):
        return w[p + ".weight"] * (x / np.sqrt((x * x).mean(-1, keepdims=True) + c["rms_norm_eps"]))

    ang = np.arange(s)[:, None] * inv_freq(c, hd)[None, :]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

    def rope(x):  # [H, S, D]
        x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
        return x * cos + np.concatenate([-x2, x1], -1) * sin

    h = w["model.embed_tokens.weight"][ids]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}"
        x = rms(h, p + ".input_layernorm")

        def proj(name, heads):
            y = x @ w[f"{p}.self_attn.{name}.weight"].T
            if qkv_bias:
                y = y + w[f"{p}.self_attn.{name}.bias"]
            return y.reshape(s, heads, hd).transpose(1, 0, 2)

        q, k, v = rope(proj("q_proj", nh)), rope(proj("k_proj", g)), proj("v_proj", g)
        rep = nh // g
        k, v = np.repeat(k, rep, axis=0), np.repeat(v, rep, axis=0)
        a = causal_attention(q, k, v)
        h = h + a @ w[p + ".self_attn.o_proj.weight"].T
        x = rms(h, p + ".post_attention_layernorm")
        gate = x @ w[p + ".mlp.gate_proj.weight"].T
        up = x @ w[p + ".mlp.up_proj.weight"].T
        h = h + (gate / (1 + np.exp(-gate)) * up) @ w[p + ".mlp.down_proj.weight"].T
    head = w["model.embed_tokens.weight"] if c["tie_word_embeddings"] else w["lm_head.weight"]
    return rms(h, "model.norm") @ head.T


# ---------------------------------------------------------------- configs and weights

def gpt2_model(rng, vocab):
    c = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_layer": 2, "n_embd": 64,
         "n_head": 4, "n_positions": 128, "n_ctx": 128, "vocab_size": vocab,
         "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new", "tie_word_embeddings": True,
         "torch_dtype": "float32"}
    d = c["n_embd"]
    t = {"wte.weight": (vocab, d), "wpe.weight": (128, d), "ln_f.weight": (d,), "ln_f.bias": (d,)}
    for i in range(c["n_layer"]):
        p = f"h.{i}"
        t.update({p + ".ln_1.weight": (d,), p + ".ln_1.bias": (d,), p + ".ln_2.weight": (d,),
                  p + ".ln_2.bias": (d,), p + ".attn.c_attn.weight": (d, 3 * d),
                  p + ".attn.c_attn.bias": (3 * d,), p + ".attn.c_proj.weight": (d, d),
                  p + ".attn.c_proj.bias": (d,), p + ".mlp.c_fc.weight": (d, 4 * d),
                  p + ".mlp.c_fc.bias": (4 * d,), p + ".mlp.c_proj.weight": (4 * d, d),
                  p + ".mlp.c_proj.bias": (d,)})
    return c, init(rng, t)


def llama_model(rng, vocab, kind):
    c = {"model_type": kind, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": vocab,
         "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
         "hidden_act": "silu", "tie_word_embeddings": True, "torch_dtype": "float32",
         "attention_bias": False}
    if kind == "llama":
        c["architectures"] = ["LlamaForCausalLM"]
        c["rope_scaling"] = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
        c["rope_theta"] = 500000.0
    elif kind == "qwen2":
        c.update({"architectures": ["Qwen2ForCausalLM"], "rope_theta": 1000000.0,
                  "tie_word_embeddings": False, "use_sliding_window": False,
                  "sliding_window": 32, "max_window_layers": 2,
                  "rope_scaling": {"type": "linear", "factor": 2.0}})
    elif kind == "mistral":
        c.update({"architectures": ["MistralForCausalLM"], "num_key_value_heads": 1,
                  "head_dim": 32, "sliding_window": 64, "tie_word_embeddings": False})
    d, ff = c["hidden_size"], c["intermediate_size"]
    hd = c.get("head_dim") or d // c["num_attention_heads"]
    eq, ekv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    t = {"model.embed_tokens.weight": (vocab, d), "model.norm.weight": (d,)}
    if not c["tie_word_embeddings"]:
        t["lm_head.weight"] = (vocab, d)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}"
        t.update({p + ".input_layernorm.weight": (d,), p + ".post_attention_layernorm.weight": (d,),
                  p + ".self_attn.q_proj.weight": (eq, d), p + ".self_attn.k_proj.weight": (ekv, d),
                  p + ".self_attn.v_proj.weight": (ekv, d), p + ".self_attn.o_proj.weight": (d, eq),
                  p + ".mlp.gate_proj.weight": (ff, d), p + ".mlp.up_proj.weight": (ff, d),
                  p + ".mlp.down_proj.weight": (d, ff)})
        if kind == "qwen2":
            t.update({p + ".self_attn.q_proj.bias": (eq,), p + ".self_attn.k_proj.bias": (ekv,),
                      p + ".self_attn.v_proj.bias": (ekv,)})
    return c, init(rng, t)


def init(rng, shapes):
    out = {}
    for name, shape in sorted(shapes.items()):
        if len(shape) == 1 and name.endswith("weight"):
            out[name] = 1.0 + 0.1 * rng.standard_normal(shape)
        elif len(shape) == 1:
            out[name] = 0.05 * rng.standard_normal(shape)
        else:
            out[name] = rng.standard_normal(shape) * (0.7 / np.sqrt(min(shape)))
    return {k: v.astype(np.float32) for k, v in out.items()}


def reference(forward, w, c, prompt_ids):
    ids = list(prompt_ids)
    logits, tokens = [], []
    for _ in range(STEPS + 1):
        last = forward(w, c, np.array(ids))[-1]
        logits.append([float(x) for x in last])
        tok = int(np.argmax(last))
        tokens.append(tok)
        ids.append(tok)
    return logits, tokens


def torch_check(folder, prompt_ids, logits, tokens=None):
    """With torch and transformers importable: the folder's logits at every step (full forward
    passes over the growing sequence) agree with `logits` within 1e-4, and transformers' own
    greedy `generate` (with its KV cache) gives `tokens`. Returns the largest difference."""
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError:
        return None
    m = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    ids = list(prompt_ids)
    worst = 0.0
    with torch.no_grad():
        for step, want in enumerate(logits):
            out = m(torch.tensor([ids])).logits[0, -1].numpy()
            worst = max(worst, float(np.abs(out - np.array(want)).max()))
            if tokens is not None and step < len(tokens):
                ids.append(tokens[step])
        if tokens is not None:
            gen = m.generate(torch.tensor([prompt_ids]), max_new_tokens=len(tokens),
                             do_sample=False, pad_token_id=0)
            got = [int(t) for t in gen[0, len(prompt_ids):]]
            assert got == tokens, f"{folder}: transformers generates {got}, reference {tokens}"
    print(f"  {folder}: transformers agrees to {worst:.2e} over {len(logits)} steps"
          + ("; its greedy generate gives the reference tokens" if tokens is not None else ""))
    assert worst < 1e-4
    return worst


def check(root):
    """Checks committed folders against transformers (needs torch): `--check DIR`."""
    for kind in ["gpt2", "llama", "qwen2", "mistral"]:
        folder = os.path.join(root, kind)
        with open(os.path.join(folder, "reference.json")) as f:
            ref = json.load(f)
        if torch_check(folder, ref["prompt_ids"], ref["logits"], ref["tokens"]) is None:
            sys.exit("--check needs torch and transformers (pip install torch transformers)")


def main(root):
    tok = tokenizer()
    vocab = tok.get_vocab_size()
    assert vocab <= VOCAB
    prompt_ids = tok.encode(PROMPT).ids
    for i, kind in enumerate(["gpt2", "llama", "qwen2", "mistral"]):
        rng = np.random.default_rng(1000 + i)
        folder = os.path.join(root, kind)
        os.makedirs(folder, exist_ok=True)
        for f in os.listdir(folder):
            os.remove(os.path.join(folder, f))
        if kind == "gpt2":
            c, t = gpt2_model(rng, VOCAB)
            forward = gpt2_forward
        else:
            c, t = llama_model(rng, VOCAB, kind)
            forward = llama_forward
        dtype, shards = {"gpt2": ("F32", 1), "llama": ("F32", 1), "qwen2": ("F16", 2),
                         "mistral": ("BF16", 1)}[kind]
        c["torch_dtype"] = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[dtype]
        w = save(folder, t, dtype, shards)
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(c, f, indent=2, sort_keys=True)
        tok.save(os.path.join(folder, "tokenizer.json"))
        logits, tokens = reference(forward, w, c, prompt_ids)
        ref = {"prompt": PROMPT, "prompt_ids": prompt_ids, "tokens": tokens,
               "text": tok.decode(tokens), "logits": logits,
               "source": "numpy float64 forward pass of scripts/make-fixtures.py"}
        with open(os.path.join(folder, "reference.json"), "w") as f:
            json.dump(ref, f)
        size = sum(os.path.getsize(os.path.join(folder, x)) for x in os.listdir(folder))
        print(f"{kind}: {size} bytes, prompt {prompt_ids}, greedy {tokens}")
        torch_check(folder, prompt_ids, logits, tokens)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--check":
        check(sys.argv[2] if len(sys.argv) > 2 else "runtime/tests/fixtures")
    else:
        main(sys.argv[1] if len(sys.argv) > 1 else "runtime/tests/fixtures")
