"""Attention of decoding rows against their caches: every sequence's decode step in one call.

    decode_attention(q, k_new, v_new, keys, values, capacities, layer, positions, scale)
        K_s[layer, :, positions[s]] = k_new[s]; V_s[layer, :, positions[s]] = v_new[s]; then
        out[s, h] = softmax(q[s, h] · k[g, :T]ᵀ · scale) · v[g, :T],
        k, v = K_s[layer], V_s[layer],  T = positions[s] + 1,  g = h // (heads / kv_heads)

q (n, heads, d): one query row for each of n sequences; k_new, v_new (n, kv_heads, d); keys,
values (n,) intp: the addresses of each sequence's cache arrays K_s, V_s, (layers, kv_heads,
capacities[s], d) float32, C-contiguous, which the caller keeps alive. Returns (n, heads, d)
float32. Sums run in float32, as NumPy's would, and a row's arithmetic is the same whatever
other sequences share the call.

Why addresses: the caches are separate arrays, and a typed list of them costs each process
1.4 s of compiling before its first step (Numba does not cache a typed list's methods).

Why one call for all sequences: in NumPy a decoding row's attention is eight small array
operations, paid per sequence and layer (240 a step for eight sequences of SmolLM2's 30
layers, 50 of its 116 ms); a compiled call per sequence and layer took 21 ms. One call per
layer runs all (sequence, head) pairs in parallel: on a 2-vCPU AVX-512 Xeon, eight SmolLM2
sequences at position 300 took 18-20 ms a step against 26-32 ms with a call per sequence.
"""
import numpy as np
from numba import carray, njit, prange, types
from numba.extending import intrinsic

from .dense import FASTMATH


@intrinsic
def float32_at(typingctx, address):
    """The float32 pointer at an address (intp)."""
    pointer = types.CPointer(types.float32)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(pointer))
    return pointer(types.intp), codegen


@njit(cache=True)
def cache_layer(address, capacity, layer, kv_heads, d):
    """Layer `layer` of the cache array at `address`, (kv_heads, capacity, d)."""
    return carray(float32_at(address + 4 * layer * kv_heads * capacity * d), (kv_heads, capacity, d))


@njit(cache=True)
def store_position(address, capacity, layer, position, row):
    """cache[layer, :, position] = row (kv_heads, d), for the cache array at `address`. A
    function of its own: written inline in the parallel kernel, the store did not happen (the
    kernel test caught it), presumably removed by Numba's parallel passes, which cannot see
    that an array made from a pointer is the cache."""
    kv_heads, d = row.shape
    cache_layer(address, capacity, layer, kv_heads, d)[:, position] = row


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def decode_attention(q, k_new, v_new, keys, values, capacities, layer, positions, scale):
    n, heads, d = q.shape
    kv_heads = k_new.shape[1]
    group = heads // kv_heads
    for s in range(n):
        store_position(keys[s], capacities[s], layer, positions[s], k_new[s])
        store_position(values[s], capacities[s], layer, positions[s], v_new[s])
    out = np.zeros((n, heads, d), dtype=np.float32)       # (n, heads, d)
    for task in prange(n * heads):
        s, h = task // heads, task % heads
        k = cache_layer(keys[s], capacities[s], layer, kv_heads, d)      # (kv_heads, capacity, d)
        v = cache_layer(values[s], capacities[s], layer, kv_heads, d)
        g, length = h // group, positions[s] + 1
        scores = np.empty(length, dtype=np.float32)       # (T,)
        largest = np.float32(-np.inf)
        for t in range(length):
            dot = np.float32(0.0)
            for i in range(d):
                dot += q[s, h, i] * k[g, t, i]
            scores[t] = dot * scale
            largest = max(largest, scores[t])
        total = np.float32(0.0)
        for t in range(length):
            scores[t] = np.exp(scores[t] - largest)
            total += scores[t]
        for t in range(length):
            weight = scores[t] / total
            for i in range(d):
                out[s, h, i] += weight * v[g, t, i]
    return out


def decode_attention_numpy(q: np.ndarray, k: np.ndarray, v: np.ndarray, length: int, scale: float) -> np.ndarray:
    """The twin for one sequence, in float64: q (heads, d), k, v (kv_heads, ≥ length, d)."""
    group = q.shape[0] // k.shape[0]
    k, v = k[:, :length], v[:, :length]
    keys, values = np.repeat(k, group, axis=0).astype(np.float64), np.repeat(v, group, axis=0).astype(np.float64)
    scores = np.einsum("hd,htd->ht", q.astype(np.float64), keys) * scale       # (heads, T)
    weights = np.exp(scores - scores.max(axis=1, keepdims=True))
    weights /= weights.sum(axis=1, keepdims=True)
    return np.einsum("ht,htd->hd", weights, values)
