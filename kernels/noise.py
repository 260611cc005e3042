r"""Position-keyed noise: Exp(1) variables E(key, position, token), the same on every backend.

A request's race noise at absolute position t (the index of the token in its sequence, prompt
included) and token v is a function of (key, t, v) alone, where key is the request's seed (or a
random key drawn for an unseeded request).  Sampling x_t = argmax_v p_t(v) / E(key, t, v) is then
plain decoding with a fixed noise tape, and any method that commits exactly these race winners
(`step.py`'s Gumbel-coupled verification) reproduces plain decoding's tokens for that key,
whatever its windows, batch, chunking or preemption did.

Counter-based, so no generator state exists to drift between steps, ranks or devices:
    request   k = mix(mix(seed_lo ^ salt) ^ seed_hi)           (salt: one stream per use)
    row       a = mix(k ^ mix(t ^ C)),  b = mix(a ^ k ^ salt)   (host, O(rows))
    element   h(v) = mix(mix(v + a) ^ b)                        uint32
    u(v)      = ((h >> 8) + 1/2) / 2^24                      in (0, 1), exact in float32
    E(v)      = float32(-log(float64 u))
`mix` is Wellons' lowbias32 integer finaliser (hash-prospector), a bijection on uint32; so a
row's 2^24-level uniforms are distinct functions of distinct tokens.  The logarithm runs in float64
and is rounded once to float32: backends whose float64 logs differ by an ulp still agree in
float32 except where the exact value sits within 2^-52 of a float32 rounding midpoint.

Implementations: `keyed_exponentials_torch` (PyTorch, int64 arithmetic masked to 32 bits, any
device; fused by TorchInductor for large blocks), `keyed_exponentials_numpy` (the uint32
reference, also what small blocks on CPU use: some 20 operations over a few thousand elements
cost 4-8x less in NumPy than in eager PyTorch) and `noise_triton.keyed_exponentials_triton`
(CUDA).  They agree exactly (tests/test_position_noise.py).
"""

from __future__ import annotations

import numpy as np
import torch

from .host import INDUCTOR_MIN_ELEMENTS, upload

M32 = 0xFFFFFFFF
_C1, _C2 = 0x7FEB352D, 0x846CA68B  # lowbias32's multipliers
SALT_RACE, SALT_FRESH = 0x9E3779B9, 0x85EBCA6B  # one stream per use of a request's key
_SCALE = 2.0**-24


def _mix_numpy_(x: np.ndarray) -> np.ndarray:
    """lowbias32 of uint32 x, in place; returns x."""
    x ^= x >> np.uint32(16)
    x *= np.uint32(_C1)
    x ^= x >> np.uint32(15)
    x *= np.uint32(_C2)
    x ^= x >> np.uint32(16)
    return x


def _mix_numpy(x: np.ndarray) -> np.ndarray:
    return _mix_numpy_(x.astype(np.uint32, copy=True))


def _uniforms64(h: np.ndarray) -> np.ndarray:
    """u = ((h >> 8) + 1/2) / 2^24 in float64, from uint32 hashes h (shifted in place)."""
    h >>= np.uint32(8)
    u = np.array(h, dtype=np.float64)
    u += 0.5
    u *= _SCALE
    return u


def request_key(seed: int) -> np.uint64:
    """A request's key from its seed (any Python integer, taken modulo 2^64)."""
    return np.uint64(int(seed) % 2**64)


def row_keys(keys: np.ndarray, positions: np.ndarray, salt: int | np.ndarray = SALT_RACE) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the two 32-bit words (a, b) that key its noise, from its request's key
    (uint64 [R]), its absolute position (int [R]) and its use's salt (one, or uint32 [R]: a
    step keys its race rows and its fresh slots in one call).  Host side.  Returns two uint32 [R]."""
    k = np.asarray(keys, dtype=np.uint64)
    salt = np.asarray(salt, dtype=np.uint32)
    lo = (k & np.uint64(M32)).astype(np.uint32)
    hi = (k >> np.uint64(32)).astype(np.uint32)
    with np.errstate(over="ignore"):
        key = _mix_numpy(_mix_numpy(lo ^ salt) ^ hi)
        pos = _mix_numpy(np.asarray(positions, dtype=np.int64).astype(np.uint32) ^ np.uint32(_C1))
        a = _mix_numpy(key ^ pos)
        b = _mix_numpy(a ^ key ^ salt)
    return a, b


def exponentials_at(a: np.ndarray, b: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """The reference, element by element: float32 Exp(1) E(v) of the rows keyed (a, b) at tokens
    v (uint32 a, b and integer tokens of one broadcast shape)."""
    with np.errstate(over="ignore"):
        h = np.asarray(tokens).astype(np.uint32) + np.asarray(a, dtype=np.uint32)
        h = _mix_numpy_(_mix_numpy_(h) ^ np.asarray(b, dtype=np.uint32))
    u = _uniforms64(h)  # in place from here (a keyed race's chunk: 2^16 elements)
    np.log(u, out=u)
    return np.negative(u, out=u).astype(np.float32)


def keyed_exponentials_numpy(a: np.ndarray, b: np.ndarray, vocab_size: int) -> np.ndarray:
    """The reference: [R, V] float32 Exp(1) for rows keyed (a, b)."""
    return exponentials_at(np.asarray(a)[:, None], np.asarray(b)[:, None], np.arange(vocab_size, dtype=np.uint32)[None, :])


def keyed_uniforms(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """One float32 uniform in (0, 1) per row key: for host-side draws (fresh tokens)."""
    with np.errstate(over="ignore"):
        h = _mix_numpy(_mix_numpy(a) ^ b)
    return _uniforms64(h).astype(np.float32)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for int64 x in [0, 2^32), without a product past 2^63."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & M32


def _mix_torch(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, _C1)
    x = x ^ (x >> 15)
    x = _mul32(x, _C2)
    return x ^ (x >> 16)


def _exponentials_torch(a: torch.Tensor, b: torch.Tensor, vocab_size: int) -> torch.Tensor:
    v = torch.arange(vocab_size, dtype=torch.int64, device=a.device)[None, :]
    h = _mix_torch(_mix_torch((v + a[:, None]) & M32) ^ b[:, None])
    u = ((h >> 8).to(torch.float64) + 0.5) * _SCALE
    return u.log_().neg_().to(torch.float32)


_fused = None


def keyed_exponentials_torch(a, b, vocab_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[R, V] float32 Exp(1) for rows keyed (a, b) (uint32 arrays), on `device`.  Some 20 integer
    operations per element: eager below INDUCTOR_MIN_ELEMENTS, above it one loop fused by
    TorchInductor (12 ms for 330 x 16384 on 2 cores, against 620 ms eager; compiled once)."""
    global _fused
    a_t, b_t = upload(np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64), device=device)
    if a_t.numel() * vocab_size < INDUCTOR_MIN_ELEMENTS:
        return _exponentials_torch(a_t, b_t, vocab_size)
    if _fused is None:
        _fused = torch.compile(_exponentials_torch, dynamic=True)
    return _fused(a_t, b_t, vocab_size)


def compile_keyed_exponentials(vocab_size: int, device: torch.device | str = "cpu") -> None:
    """Compile the fused noise now (it is compiled on its first call above INDUCTOR_MIN_ELEMENTS),
    at two row counts past that size (dynamic shapes).  Raises what TorchInductor raises where it
    cannot compile, after which the noise is computed eagerly (the same values)."""
    global _fused
    rows = max(2, -(-INDUCTOR_MIN_ELEMENTS // vocab_size))
    try:
        for r in (rows, rows + 1):
            keyed_exponentials_torch(np.arange(r), np.arange(r) + 7, vocab_size, device)
    except Exception:
        _fused = _exponentials_torch
        raise


def keyed_exponentials(a, b, vocab_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The noise rows on `device`: Triton on CUDA; on CPU NumPy below INDUCTOR_MIN_ELEMENTS
    (33 x 274: 0.04 against 0.19 ms eager, 330 x 274: 0.25 against 2.0 ms, on 1 thread of the
    2-core EPYC of benchmarks/README.md), PyTorch above and elsewhere; the same values either way."""
    device = torch.device(device)
    if device.type == "cuda":
        from .noise_triton import keyed_exponentials_triton

        return keyed_exponentials_triton(a, b, vocab_size, device)
    if device.type == "cpu" and len(a) * vocab_size < INDUCTOR_MIN_ELEMENTS:
        return torch.from_numpy(keyed_exponentials_numpy(np.asarray(a, dtype=np.uint32), np.asarray(b, dtype=np.uint32), vocab_size))
    return keyed_exponentials_torch(a, b, vocab_size, device)
