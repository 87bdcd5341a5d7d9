"""Randomized-Hadamard building block: y = ((x·diag(a))·Hᵀ·scale)·diag(b), H orthonormal.

Order n = K·P with P a power of two and K = 1 or the order of a small Hadamard matrix built by
Paley's constructions (K = 12 for 192 and 1536, 36 for 576, 20 for 2560 and 5120, 52 for 6656, 60
for 960, 108 for 13824, 140 for 17920, 344 for 11008 and 22016). The row index i = k·P + j, and
H = (H_K ⊗ H_P)/√n with H_P the Sylvester (Walsh–Hadamard, natural order) matrix. H_P is
symmetric; H_K need not be, so `transpose=True` applies Hᵀ = (H_Kᵀ ⊗ H_P)/√n, the inverse of H.

`pre_scale` a [n] or [G, n] and `post_scale` b [n] or [G, n] multiply elementwise before and after
the transform (QuIP#'s sign vectors), broadcasting against x [..., n] as `x * a` would: with
[G, n] scales and x [..., 1, n], one call transforms x under G different sign vectors (the
inputs of q, k and v at a decode step). Layouts: x in any float dtype and any strides with a unit
last stride (others are copied); the result is a new tensor of the broadcast shape in `out_dtype`
(default x's), or `out`. Accumulation is fp32 throughout (a 2-bit layer's inputs overflow fp16
after the transform).

The Triton kernels keep a row block in registers from load to store, so sign scaling and the
dtype casts cost no extra pass:
- K = 1 (`_fwht_kernel`): log2(P) rounds of the constant-geometry butterfly
  y = [x₀+x₁, x₂+x₃, …, x₀−x₁, x₂−x₃, …], whose P-fold repetition is exactly H_P in natural order
  (Pease's form of the FFT);
- K > 1 (`_hadamard_k_kernel`): H_K and H_P act on different axes of the [K, P] view, so they
  commute. A program owns a block of BLOCK_K output k's for BLOCK_M rows: it accumulates
  H_K[k-block, :]·X over the input k's as tensor-core dots (H_K zero-padded to a multiple of 64, so
  K need not be a power of two), then runs the butterflies on its [BLOCK_K, BLOCK_M·P] result. H_K
  has entries ±1, exact in bf16; x·a is split into bf16 pieces (hi + mid + lo: 24 significant
  bits, fp32's) so every product is exact and only the fp32 accumulation rounds. One piece suffices
  for bf16 inputs without a pre-scale (the transposed transform after a bf16 matmul), two for fp16.
"""

from __future__ import annotations

import functools
import math

import torch

from gpu_kernels._dispatch import (
    dependent_launch,
    device_constant,
    fastest_config,
    interpreting,
    launchable,
    triton_available,
    use_triton,
)

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


@functools.cache
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


##### Device-resident factors #####

SMALL_PAD = 64  # tables are zero-padded to a multiple of this: the largest BLOCK_K


def hadamard_table(k: int, a: int, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The unnormalized H_K ⊗ H_a (H_a Sylvester, a a power of two) zero-padded to [RPAD, RPAD] (RPAD
    the next multiple of 64 above K·a) on `device`, built once per (K, a, device, dtype)
    (`gpu_kernels._dispatch.device_constant`)."""

    def build() -> torch.Tensor:
        sylvester = torch.ones(1, 1, dtype=torch.int64)
        while sylvester.shape[0] < a:
            sylvester = torch.kron(torch.tensor([[1, 1], [1, -1]]), sylvester)
        small = torch.ones(1, 1, dtype=torch.int64) if k == 1 else _small_hadamard(k)
        order = k * a
        padded = -(-order // SMALL_PAD) * SMALL_PAD
        table = torch.zeros(padded, padded, dtype=dtype)
        table[:order, :order] = torch.kron(small, sylvester)
        return table

    return device_constant(f"hadamard_K{k}xH{a}_{dtype}", device, build)


##### Reference #####


def _apply_small(y: torch.Tensor, k: int, transpose: bool) -> torch.Tensor:
    """y [rows, K·P] fp32 -> (H_K or H_Kᵀ) applied along the K index of the [rows, K, P] view."""
    if k == 1:
        return y
    small = hadamard_table(k, 1, y.device)[:k, :k]
    small = small.T if transpose else small
    return torch.matmul(small, y.view(y.shape[0], k, -1)).view(y.shape[0], -1)


def hadamard_ref(
    x: torch.Tensor,
    transpose: bool = False,
    scale: float | None = None,
    pre_scale: torch.Tensor | None = None,
    post_scale: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """((x·diag(pre_scale))·Hᵀ (or ·H with `transpose`)·scale)·diag(post_scale), in fp32, returned in
    `out_dtype` (default x's). `scale` defaults to 1/√n (orthonormal)."""
    n = x.shape[-1]
    k, p = hadamard_factors(n)
    y = x.to(torch.float32)
    if pre_scale is not None:
        y = y * pre_scale.to(torch.float32)
    shape = y.shape
    y = y.reshape(-1, n)
    rows = y.shape[0]
    half = 1
    while half < p:  # radix-2 butterflies, natural (Sylvester) order
        y = y.view(rows, -1, 2, half)
        y = torch.stack((y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]), dim=2)
        half *= 2
    y = _apply_small(y.reshape(rows, n), k, transpose)
    y = (y * (1 / math.sqrt(n) if scale is None else scale)).view(shape)
    if post_scale is not None:
        y = y * post_scale.to(torch.float32)
    return y.to(x.dtype if out_dtype is None else out_dtype)


##### Triton #####

if triton_available():
    from gpu_kernels._pdl import wait_for_inputs

    @triton.jit
    def _row_offsets(rows, GROUPS: tl.constexpr, stride_outer, stride_inner):
        """int64 offsets of rows r = outer·GROUPS + inner of a [outer, GROUPS, n] view."""
        rows = rows.to(tl.int64)
        return (rows // GROUPS) * stride_outer + (rows % GROUPS) * stride_inner

    @triton.jit
    def _butterflies(x, ROWS: tl.constexpr, P: tl.constexpr, LOG_P: tl.constexpr):
        """x [ROWS, P] fp32 -> x·H_P (unnormalized) along each row: LOG_P constant-geometry rounds."""
        for _ in tl.static_range(LOG_P):
            # One round: pairs (2i, 2i+1) -> sums first, then differences.
            even, odd = tl.split(tl.reshape(x, (ROWS, P // 2, 2)))
            x = tl.reshape(tl.permute(tl.join(even + odd, even - odd), (0, 2, 1)), (ROWS, P))
        return x

    @triton.jit
    def _dot_pieces(a, b, acc, PIECES: tl.constexpr, DOT_DTYPE: tl.constexpr, SPLIT_LEFT: tl.constexpr):
        """acc + a·b with one operand ±1/0 (exact in bf16) and the other, fp32, taken as PIECES bf16
        pieces (hi, mid, lo), so every product is exact and only the fp32 sums round. SPLIT_LEFT: a
        is the fp32 one. DOT_DTYPE: bf16 on a GPU; fp32 under the interpreter (which multiplies
        bf16 bit patterns as integers), where the bf16-rounded pieces give the same sums."""
        if SPLIT_LEFT:
            rest = a
        else:
            rest = b
        for _ in tl.static_range(PIECES):
            piece = rest.to(tl.bfloat16)
            if SPLIT_LEFT:
                acc = tl.dot(piece.to(DOT_DTYPE), b, acc)
            else:
                acc = tl.dot(a, piece.to(DOT_DTYPE), acc)
            rest = rest - piece.to(tl.float32)
        return acc

    @triton.jit
    def _fwht_kernel(
        x_ptr, pre_ptr, post_ptr, y_ptr, rows,
        stride_xo, stride_xi, stride_pre, stride_post, stride_yo, stride_yi, scale,
        P: tl.constexpr, LOG_P: tl.constexpr, BLOCK_M: tl.constexpr, GROUPS: tl.constexpr,
        HAS_PRE: tl.constexpr, HAS_POST: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        """K = 1, butterflies: program m transforms rows [m·BLOCK_M, (m+1)·BLOCK_M) whole, in registers."""
        wait_for_inputs(PDL)
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_p = tl.arange(0, P)
        mask = (offs_m < rows)[:, None]
        x_rows = _row_offsets(offs_m, GROUPS, stride_xo, stride_xi)
        x = tl.load(x_ptr + x_rows[:, None] + offs_p[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_PRE:
            pre_rows = (offs_m % GROUPS) * stride_pre
            x *= tl.load(pre_ptr + pre_rows[:, None] + offs_p[None, :], mask=mask, other=0.0).to(tl.float32)
        x = _butterflies(x, BLOCK_M, P, LOG_P) * scale
        if HAS_POST:
            post_rows = (offs_m % GROUPS) * stride_post
            x *= tl.load(post_ptr + post_rows[:, None] + offs_p[None, :], mask=mask, other=0.0).to(tl.float32)
        y_rows = _row_offsets(offs_m, GROUPS, stride_yo, stride_yi)
        tl.store(y_ptr + y_rows[:, None] + offs_p[None, :], x.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _hadamard_dot_kernel(
        x_ptr, pre_ptr, post_ptr, left_ptr, right_ptr, y_ptr, rows,
        stride_xo, stride_xi, stride_pre, stride_post, stride_yo, stride_yi,
        stride_left_out, stride_left_in, stride_right, scale,
        R: tl.constexpr, C: tl.constexpr, LOG_C: tl.constexpr, RIGHT_DOT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, GROUPS: tl.constexpr, HAS_PRE: tl.constexpr,
        HAS_POST: tl.constexpr, PIECES: tl.constexpr, OUT_PIECES: tl.constexpr, DOT_DTYPE: tl.constexpr,
        PDL: tl.constexpr,
    ):  # fmt: skip
        """Each row as a matrix X [R, C] (index r·C + c), transformed as L·X·H_C with L = H_K ⊗ H_a
        (`hadamard_table`, R = K·a) as tensor-core dots and H_C either as butterflies or, with
        RIGHT_DOT, as one more dot. Program (m, b) computes outputs r' in [b·BLOCK_K, (b+1)·BLOCK_K)
        (all C) of rows [m·BLOCK_M, (m+1)·BLOCK_M), as a [BLOCK_K, BLOCK_M·C] tile whose column
        j = row·C + c."""
        COLS: tl.constexpr = BLOCK_M * C
        wait_for_inputs(PDL)
        offs_j = tl.arange(0, COLS)
        offs_m = tl.program_id(0) * BLOCK_M + offs_j // C  # the row of each column
        offs_c = offs_j % C
        row_ok = (offs_m < rows)[None, :]
        x_cols = _row_offsets(offs_m, GROUPS, stride_xo, stride_xi) + offs_c
        pre_cols = (offs_m % GROUPS) * stride_pre + offs_c
        offs_out = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        acc = tl.full((BLOCK_K, COLS), 0.0, tl.float32)
        for r0 in range(0, R, BLOCK_K):  # a loop, not unrolled: R/BLOCK_K is up to 24 blocks
            offs_in = r0 + tl.arange(0, BLOCK_K)
            mask = (offs_in < R)[:, None] & row_ok
            x = tl.load(x_ptr + x_cols[None, :] + (offs_in * C)[:, None], mask=mask, other=0.0)
            x = x.to(tl.float32)
            if HAS_PRE:
                pre = tl.load(pre_ptr + pre_cols[None, :] + (offs_in * C)[:, None], mask=mask, other=0.0)
                x *= pre.to(tl.float32)
            # L is zero-padded past R, so its tile needs no mask.
            left = tl.load(left_ptr + offs_out[:, None] * stride_left_out + offs_in[None, :] * stride_left_in)
            acc = _dot_pieces(left.to(DOT_DTYPE), x, acc, PIECES, DOT_DTYPE, False)
        if RIGHT_DOT:  # ·H_C (symmetric) on each row's C columns
            offs_r = tl.arange(0, C)
            right = tl.load(right_ptr + offs_r[:, None] * stride_right + offs_r[None, :]).to(DOT_DTYPE)
            rows_c = tl.reshape(acc, (BLOCK_K * BLOCK_M, C))
            zero = tl.full((BLOCK_K * BLOCK_M, C), 0.0, tl.float32)
            acc = tl.reshape(_dot_pieces(rows_c, right, zero, OUT_PIECES, DOT_DTYPE, True), (BLOCK_K, COLS))
        elif LOG_C > 0:
            rows_c = _butterflies(tl.reshape(acc, (BLOCK_K * BLOCK_M, C)), BLOCK_K * BLOCK_M, C, LOG_C)
            acc = tl.reshape(rows_c, (BLOCK_K, COLS))
        y = acc * scale
        out_mask = (offs_out < R)[:, None] & row_ok
        if HAS_POST:
            post_cols = (offs_m % GROUPS) * stride_post + offs_c
            post = tl.load(post_ptr + post_cols[None, :] + (offs_out * C)[:, None], mask=out_mask, other=0.0)
            y *= post.to(tl.float32)
        y_cols = _row_offsets(offs_m, GROUPS, stride_yo, stride_yi) + offs_c
        y_ptrs = y_ptr + y_cols[None, :] + (offs_out * C)[:, None]
        tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=out_mask)


RIGHT_DOT_COLUMNS = 64  # C of the dot form: the last 64 of P's factors of two (all of P if fewer)
DOT_FORM_MAX_ROWS = 64  # the dot form is timed only for this many rows or fewer (decode steps)


def fwht_config(p: int) -> dict[str, int]:
    """K = 1 butterflies: rows per program and warps for a row length P: about 2048 elements a program.

    One long row a program with 4 warps kept the butterflies closest to copy bandwidth when measured
    (more warps or several rows a program were slower); 16384 values would take 128 registers a thread
    at 4 warps: 8 there.
    """
    return {"BLOCK_M": max(1, min(16, 2048 // p)), "num_warps": 4 if p <= 8192 else 8, "RIGHT_DOT": 0}


def hadamard_candidates(k: int, p: int, rows: int) -> list[dict[str, int]]:
    """Configurations worth timing (the first is the default), few because each compiles per variant.

    Butterfly form (RIGHT_DOT 0): for K = 1 `fwht_config`; for K > 1 the dot over K then log2(P)
    butterfly rounds, BLOCK_M rows of P values as about 128-256 columns (at least 16, tl.dot's
    least), BLOCK_K a power of two from 16 to 64 (at most the next power of two above K), at most
    16384 fp32 accumulators a program (8 warps above 8192). Dot form (RIGHT_DOT 1, for at most
    `DOT_FORM_MAX_ROWS` rows and P >= 16): each row as [K·a, C] with C = min(P, 64), both sides as
    dots, one row a program; a decode step's row then takes a few dots instead of up to 14
    dependent butterfly rounds.
    """
    candidates = [fwht_config(p)] if k == 1 else []
    if k > 1:
        top = 1 << (k - 1).bit_length()
        for cols, block_k in ((128, 64), (128, 32), (256, 32)):
            block_m = max(1, cols // p)
            block_k = max(16, min(block_k, top, 16384 // (block_m * p)))
            warps = 4 if block_k * block_m * p <= 8192 else 8
            candidates.append({"BLOCK_M": block_m, "BLOCK_K": block_k, "num_warps": warps, "RIGHT_DOT": 0})
    if rows <= DOT_FORM_MAX_ROWS and p >= 16:
        c = min(p, RIGHT_DOT_COLUMNS)
        top = 1 << (k * p // c - 1).bit_length()
        for block_k in (64, 32):
            block_k = max(16, min(block_k, top))
            candidates.append({"BLOCK_M": 1, "BLOCK_K": block_k, "num_warps": 4, "RIGHT_DOT": 1})
    deduplicated = []
    for config in candidates:
        if config not in deduplicated:
            deduplicated.append(config)
    return deduplicated


def dot_pieces(x_dtype: torch.dtype, has_pre_scale: bool) -> int:
    """bf16 pieces per input value in the left dot: 1 for bf16 values (exact), 2 for fp16 (11
    significant bits), 3 (24 bits: fp32's) once a real-valued pre-scale or fp32 input is involved."""
    if not has_pre_scale and x_dtype == torch.bfloat16:
        return 1
    if not has_pre_scale and x_dtype == torch.float16:
        return 2
    return 3


def _scale_rows(scale: torch.Tensor | None, n: int) -> tuple[torch.Tensor | None, int, int]:
    """A [n] or [G, n] scale as (contiguous tensor, G, row stride)."""
    if scale is None:
        return None, 1, 0
    if scale.dim() not in (1, 2) or scale.shape[-1] != n:
        raise ValueError(f"scale: shape {tuple(scale.shape)}; need [{n}] or [groups, {n}]")
    scale = scale.contiguous()
    groups = 1 if scale.dim() == 1 else scale.shape[0]
    return scale, groups, n if groups > 1 else 0


def _grouped_rows(t: torch.Tensor, groups: int, writable: bool) -> tuple[torch.Tensor, int, int]:
    """t [..., groups, n] (or [..., n] when groups is 1) as rows r = outer·groups + inner:
    (a tensor with unit last stride, stride of outer, stride of inner). `writable` views must not copy."""
    n = t.shape[-1]
    if groups == 1:
        rows = t.view(-1, n) if writable else t.reshape(-1, n)
    else:
        rows = t.view(-1, groups, n) if writable else t.reshape(-1, groups, n)
    if rows.stride(-1) != 1:
        if writable:
            raise ValueError("out: the last dimension must have stride 1")
        rows = rows.contiguous()
    return rows, rows.stride(0), 0 if groups == 1 else rows.stride(1)


def hadamard_triton(
    x: torch.Tensor,
    transpose: bool = False,
    scale: float | None = None,
    pre_scale: torch.Tensor | None = None,
    post_scale: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
    config: dict[str, int] | None = None,
) -> torch.Tensor:
    """The Triton transform (see `hadamard`); `config` fixes the form and tile (one of
    `hadamard_candidates`; by default the fastest of those, timed on first use)."""
    n = x.shape[-1]
    k, p = hadamard_factors(n)
    pre, pre_groups, stride_pre = _scale_rows(pre_scale, n)
    post, post_groups, stride_post = _scale_rows(post_scale, n)
    groups = max(pre_groups, post_groups)
    if 1 < pre_groups != post_groups > 1:
        raise ValueError(f"post_scale: {post_groups} groups but pre_scale has {pre_groups}")
    shape = torch.broadcast_shapes(x.shape, *(s.shape for s in (pre, post) if s is not None))
    if out is None:
        out = torch.empty(shape, device=x.device, dtype=x.dtype if out_dtype is None else out_dtype)
    elif out.shape != shape:
        raise ValueError(f"out: shape {tuple(out.shape)}; the result has {tuple(shape)}")
    if out.numel() == 0:
        return out
    x_rows, stride_xo, stride_xi = _grouped_rows(x.expand(shape), groups, writable=False)
    y_rows, stride_yo, stride_yi = _grouped_rows(out, groups, writable=True)
    rows = y_rows.numel() // n
    scale = 1 / math.sqrt(n) if scale is None else scale
    common = dict(
        GROUPS=groups, HAS_PRE=pre is not None, HAS_POST=post is not None, **dependent_launch(x.device)
    )
    pointers = (x_rows, x_rows if pre is None else pre, x_rows if post is None else post)
    strides = (stride_xo, stride_xi, stride_pre, stride_post, stride_yo, stride_yi)
    dot_dtype = torch.float32 if interpreting() else torch.bfloat16

    def launch(cfg: dict[str, int]) -> torch.Tensor:
        cfg = dict(cfg)
        right_dot = cfg.pop("RIGHT_DOT")
        if k == 1 and not right_dot:
            launchable(_fwht_kernel)[(triton.cdiv(rows, cfg["BLOCK_M"]),)](
                *pointers, y_rows, rows, *strides, scale, P=p, LOG_P=p.bit_length() - 1, **common, **cfg
            )
            return out
        c = min(p, RIGHT_DOT_COLUMNS) if right_dot else p
        left = hadamard_table(k, p // c, x.device, dot_dtype)
        right = hadamard_table(1, c, x.device, dot_dtype)
        grid = (triton.cdiv(rows, cfg["BLOCK_M"]), triton.cdiv(k * p // c, cfg["BLOCK_K"]))
        launchable(_hadamard_dot_kernel)[grid](
            *pointers, left, right, y_rows, rows, *strides,
            *(left.stride()[::-1] if transpose else left.stride()), right.stride(0), scale,
            R=k * p // c, C=c, LOG_C=c.bit_length() - 1, RIGHT_DOT=right_dot,
            PIECES=dot_pieces(x.dtype, pre is not None), OUT_PIECES=3 if out.dtype == torch.float32 else 2,
            DOT_DTYPE=tl.float32 if dot_dtype == torch.float32 else tl.bfloat16, **common, **cfg,
        )  # fmt: skip
        return out

    if config is None:
        candidates = hadamard_candidates(k, p, rows)
        if len(candidates) == 1:
            config = candidates[0]
        else:
            key = ("hadamard", k, p, 1 << (rows - 1).bit_length(), x.dtype, out.dtype, pre is not None)
            config = fastest_config(key, candidates, launch, x.device)
    return launch(config)


def hadamard(
    x: torch.Tensor,
    transpose: bool = False,
    scale: float | None = None,
    pre_scale: torch.Tensor | None = None,
    post_scale: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """((x·diag(pre_scale))·Hᵀ (or ·H with `transpose`)·scale)·diag(post_scale) in `out_dtype`
    (default x's), written to `out` if given; Triton on CUDA, the reference elsewhere."""
    if use_triton(x):
        return hadamard_triton(x, transpose, scale, pre_scale, post_scale, out_dtype, out)
    y = hadamard_ref(x, transpose, scale, pre_scale, post_scale, out_dtype)
    return y if out is None else out.copy_(y)
