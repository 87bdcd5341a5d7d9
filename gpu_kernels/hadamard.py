"""Randomized-Hadamard building block: y = x·Hᵀ (each row vector of x multiplied by H), H orthonormal.

Order n = K·P with P a power of two and K = 1 or the order of a small Hadamard matrix built by
Paley's constructions (K = 12 for 192 and 1536, 36 for 576, 20 for 5120, 108 for 13824, 344 for
11008 and 22016). The row index i = k·P + j, and H = (H_K ⊗ H_P)/√n with H_P the Sylvester
(Walsh–Hadamard, natural order) matrix. H_P is symmetric; H_K need not be, so `transpose=True`
applies Hᵀ = (H_Kᵀ ⊗ H_P)/√n, the inverse of H.

Layouts: x [..., n] in any float dtype, contiguous or not; the result has x's shape and dtype.
Accumulation is fp32 throughout (a 2-bit layer's inputs overflow fp16 after the transform).

The Triton kernel runs the power-of-two factor in registers: log2(P) rounds of the constant-geometry
butterfly y = [x₀+x₁, x₂+x₃, …, x₀−x₁, x₂−x₃, …], whose P-fold repetition is exactly H_P in natural
order (Pease's form of the FFT). The K factor is a K×K fp32 matmul over the [..., K, P] view.
"""

from __future__ import annotations

import functools
import math

import torch

from gpu_kernels._dispatch import launchable, triton_available, use_triton

if triton_available():
    import triton
    import triton.language as tl


##### Small Hadamard matrices (Paley I and II over GF(p^k)) #####


def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, k) with q = p**k for a prime p, or None."""
    if q < 2:
        return None
    p = next(d for d in range(2, q + 1) if q % d == 0)
    k = 0
    while q % p == 0:
        q //= p
        k += 1
    return (p, k) if q == 1 else None


def _quadratic_character(p: int, k: int) -> torch.Tensor:
    """χ(a − b) for all pairs of elements of GF(p^k) [q, q]: 0 on the diagonal, +1 square, −1 not.

    Elements are integers whose base-p digits are polynomial coefficients; the product is taken
    modulo a monic irreducible polynomial of degree k (for k <= 3: one without a root in GF(p)).
    """
    q = p**k
    digits = torch.tensor([[(a // p**i) % p for i in range(k)] for a in range(q)])  # [q, k]

    def has_root(coeffs: list[int]) -> bool:
        return any(sum(c * x**i for i, c in enumerate(coeffs)) % p == 0 for x in range(p))

    if k > 3:
        raise ValueError(
            f"order: GF({p}^{k}) needs an irreducible polynomial search; only k <= 3 is built in"
        )
    tail = next(c for c in range(p**k) if k == 1 or not has_root([(c // p**i) % p for i in range(k)] + [1]))
    modulus = [(tail // p**i) % p for i in range(k)]  # x^k = -modulus(x)

    def square(a: list[int]) -> list[int]:
        prod = [0] * (2 * k - 1)
        for i, ai in enumerate(a):
            for j, aj in enumerate(a):
                prod[i + j] += ai * aj
        for top in range(2 * k - 2, k - 1, -1):  # reduce x^top with x^k = -modulus
            c, prod[top] = prod[top], 0
            for i, m in enumerate(modulus):
                prod[top - k + i] -= c * m
        return [v % p for v in prod[:k]]

    weights = torch.tensor([p**i for i in range(k)])
    squares = {int((torch.tensor(square(digits[a].tolist())) * weights).sum()) for a in range(1, q)}
    is_square = torch.tensor([a in squares for a in range(q)])
    diff = ((digits[:, None, :] - digits[None, :, :]) % p * weights).sum(-1)  # index of a − b
    chi = torch.where(is_square[diff], 1, -1)
    chi.fill_diagonal_(0)
    return chi


def _paley(order: int) -> torch.Tensor | None:
    """An unnormalized ±1 Hadamard matrix of `order` (a multiple of 4) by Paley I or II, or None."""
    pk = _prime_power(order - 1)
    if pk is not None and (order - 1) % 4 == 3:  # Paley I: H = I + [[0, 1ᵀ], [−1, Q]]
        s = torch.zeros(order, order, dtype=torch.int64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, _quadratic_character(*pk)
        return s + torch.eye(order, dtype=torch.int64)
    pk = _prime_power(order // 2 - 1)
    if order % 2 == 0 and pk is not None and (order // 2 - 1) % 4 == 1:  # Paley II
        q = order // 2 - 1
        c = torch.zeros(q + 1, q + 1, dtype=torch.int64)
        c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, _quadratic_character(*pk)
        plus = torch.tensor([[1, 1], [1, -1]])
        minus = torch.tensor([[1, -1], [-1, -1]])
        return torch.kron(c, plus) + torch.kron(torch.eye(q + 1, dtype=torch.int64), minus)
    return None


def hadamard_factors(n: int) -> tuple[int, int]:
    """(K, P) with n = K·P, P a power of two and K = 1 or the smallest Paley order that works."""
    if n <= 0:
        raise ValueError(f"n: {n} must be positive")
    odd, p = n, 1
    while odd % 2 == 0:
        odd, p = odd // 2, p * 2
    if odd == 1:
        return 1, n
    k = odd * 4
    while k <= n:
        if _small_hadamard(k) is not None:
            return k, n // k
        k *= 2
    raise ValueError(
        f"n: no Hadamard matrix of order {n} = {odd}·2^{int(math.log2(p))} is built in "
        f"(needs a Paley order K·2^a with K a multiple of {odd})"
    )


@functools.cache
def _small_hadamard(k: int) -> torch.Tensor | None:
    return None if k % 4 else _paley(k)


def hadamard_matrix(
    n: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The dense orthonormal H [n, n] that `hadamard` applies (for tests and dense references)."""
    k, p = hadamard_factors(n)
    sylvester = torch.ones(1, 1)
    while sylvester.shape[0] < p:
        sylvester = torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]]), sylvester)
    small = torch.ones(1, 1) if k == 1 else _small_hadamard(k).float()
    return (torch.kron(small, sylvester) / math.sqrt(n)).to(device=device, dtype=dtype)


##### Reference #####


def _apply_small(y: torch.Tensor, k: int, transpose: bool) -> torch.Tensor:
    """y [rows, K·P] fp32 -> (H_K or H_Kᵀ) applied along the K index of the [rows, K, P] view."""
    if k == 1:
        return y
    small = _small_hadamard(k).to(device=y.device, dtype=torch.float32)
    small = small.T if transpose else small
    return torch.matmul(small, y.view(y.shape[0], k, -1)).view(y.shape[0], -1)


def hadamard_ref(x: torch.Tensor, transpose: bool = False, scale: float | None = None) -> torch.Tensor:
    """x [..., n] -> x·Hᵀ (or x·H with `transpose`), times `scale` (default 1/√n: orthonormal)."""
    n = x.shape[-1]
    k, p = hadamard_factors(n)
    y = x.reshape(-1, n).to(torch.float32)
    rows = y.shape[0]
    half = 1
    while half < p:  # radix-2 butterflies, natural (Sylvester) order
        y = y.view(rows, -1, 2, half)
        y = torch.stack((y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]), dim=2)
        half *= 2
    y = _apply_small(y.reshape(rows, n), k, transpose)
    y = y * (1 / math.sqrt(n) if scale is None else scale)
    return y.view(x.shape).to(x.dtype)


##### Triton #####

if triton_available():

    @triton.jit
    def _fwht_kernel(
        x_ptr,
        y_ptr,
        rows,
        stride_xm,
        stride_ym,
        scale,
        P: tl.constexpr,
        LOG_P: tl.constexpr,
        BLOCK_M: tl.constexpr,
    ):
        pid = tl.program_id(0)
        offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_p = tl.arange(0, P)
        mask = (offs_m < rows)[:, None]
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_p[None, :], mask=mask, other=0.0).to(
            tl.float32
        )
        for _ in tl.static_range(LOG_P):
            # One constant-geometry round: pairs (2i, 2i+1) -> sums first, then differences.
            even, odd = tl.split(tl.reshape(x, (BLOCK_M, P // 2, 2)))
            x = tl.reshape(tl.permute(tl.join(even + odd, even - odd), (0, 2, 1)), (BLOCK_M, P))
        y = (x * scale).to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_p[None, :], y, mask=mask)


def fwht_config(p: int) -> dict[str, int]:
    """Rows per program and warps for a row length P: about 2048 elements per program, 4 warps.

    At LLaMA's power-of-two widths one row per program with 4 warps was the fastest configuration
    bench/quip_kernels.py times; 8 warps, or several rows a program, were slower.
    """
    return {"BLOCK_M": max(1, min(16, 2048 // p)), "num_warps": 4}


def fwht_triton(
    x: torch.Tensor,
    scale: float,
    out_dtype: torch.dtype = torch.float32,
    config: dict[str, int] | None = None,
) -> torch.Tensor:
    """x [rows, P] (P a power of two, unit column stride) -> x·H_Pᵀ·scale in `out_dtype` (fp32 inside)."""
    rows, p = x.shape
    if p & (p - 1) or x.stride(1) != 1:
        raise ValueError(f"x: rows of length {p} with column stride {x.stride(1)}; need a power of two and 1")
    config = config or fwht_config(p)
    y = torch.empty(rows, p, device=x.device, dtype=out_dtype)
    grid = (triton.cdiv(rows, config["BLOCK_M"]),)
    launchable(_fwht_kernel)[grid](
        x, y, rows, x.stride(0), y.stride(0), scale,
        P=p, LOG_P=p.bit_length() - 1, BLOCK_M=config["BLOCK_M"], num_warps=config["num_warps"],
    )  # fmt: skip
    return y


def hadamard(x: torch.Tensor, transpose: bool = False, scale: float | None = None) -> torch.Tensor:
    """x [..., n] -> x·Hᵀ (or x·H with `transpose`); Triton on CUDA, the reference elsewhere."""
    if not use_triton(x):
        return hadamard_ref(x, transpose, scale)
    n = x.shape[-1]
    k, p = hadamard_factors(n)
    rows = x.reshape(-1, p).contiguous()
    scale = 1 / math.sqrt(n) if scale is None else scale
    if k == 1:
        return fwht_triton(rows, scale, x.dtype).view(x.shape)
    y = fwht_triton(rows, scale).view(-1, n)  # fp32 until the K factor is applied
    return _apply_small(y, k, transpose).view(x.shape).to(x.dtype)
