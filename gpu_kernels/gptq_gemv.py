"""y = x·Wᵀ for one row at a time (batch-1 decode) straight from GPTQ-packed 2/4/8-bit weights.

At one row a matmul is a stream of packed words, so the kernel must keep HBM busy while doing as
little as possible per code. At HBM bandwidth the chip must take in billions of codes per
millisecond (twice as many at 2 bits as at 4), which leaves only a few instructions per code across
all its cores. So, per tile of `BLOCK_W` packed
words (all in one quantization group) × `BLOCK_N` output columns, a thread holding a few columns:
- no int→float conversion instruction (a quarter-rate unit): each half-word OR-ed once with the
  exponent bits of 2²³, one AND with a constant cuts a code out in place as the float 2²³ + q·2ᵖ,
  and subtracting 2²³ gives q·2ᵖ exactly; x (a scalar, the same for every thread) is scaled by 2⁻ᵖ.
  Three instructions per code (AND, subtract, FMA) plus the input value's share;
- on GPUs of compute capability 8.0+, 2- and 4-bit codes go two at a time through fp16x2
  instructions instead (`step_dot_ptx`): about two instructions per code plus the input's share,
  with 16 products per fp16 lane summed in fp16 (each add rounds to 2⁻¹¹ relative) before they
  join the fp32 sum. Triton's interpreter, 8-bit weights and tiles of fewer words than a step
  take the fp32 form above;
- the zero point is applied once per tile and column, from the tile's sum of x:
  Σₖ xₖ·s·(qₖ − z) = s·(Σₖ xₖ·qₖ − z·Σₖ xₖ);
- each program owns a column block and a short slice of the reduction, a few tiles: many small
  programs keep more loads in flight than a few long ones; where the slices divide the words,
  no load needs a bounds check (`EVEN`). Split-K adds the slices with fp32
  atomics into a workspace that is zero between calls; the last program to arrive at a column
  block takes the sum (and zeroes it), writes the output in x's dtype and resets the
  block's arrival counter. One kernel per product: no zeroing before, no cast after.
Rows beyond the first are further programs over the same columns: they read the same tiles at
the same time, mostly from L2. Act-order weights (gathered groups) take `gptq_matmul`'s tile kernel.
Tile sizes and the split are chosen per shape by timing (`gpu_kernels._dispatch.fastest_config`).
"""

import functools

import torch

from gpu_kernels._dispatch import (
    dependent_launch,
    fastest_config,
    launchable,
    split_k_workspace,
    triton_available,
)
from gpu_kernels.materialize_gptq import EXPONENT_BITS, contiguous_group_size, materialize_gptq_ref

GEMV_BITS = (2, 4, 8)
GEMV_MAX_REGISTERS = 80
HALF2_BITS = (2, 4)  # bit widths whose codes the kernel multiplies in fp16 pairs on a GPU
CODE_SHIFT = 6  # in fp16 pairs the codes enter the products as q·2⁻⁶ (`step_dot_ptx`)


def gptq_gemv_ref(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    zero_offset: int = 1,
) -> torch.Tensor:
    """x [..., in] -> x·Wᵀ [..., out], W materialized in float32, result in x's dtype."""
    w = materialize_gptq_ref(qweight, qzeros, scales, g_idx, bits, zero_offset, torch.float32)
    return (x.to(torch.float32) @ w.T).to(x.dtype)


def gemv_tile_words(bits: int, group_size: int, n_groups: int) -> int:
    """Packed words per tile row block: the most (≤ 32) that never straddle a group; 0 where the
    kernel cannot run the weight (other bit widths, gathered groups, groups of part words)."""
    if bits not in GEMV_BITS or group_size <= 0:
        return 0
    pack = 32 // bits
    if n_groups == 1:
        return 32
    if group_size % pack:
        return 0
    words = group_size // pack
    return min(32, words & -words)  # the largest power of two dividing the words of a group


@functools.cache
def fp16_pairs(device: torch.device) -> bool:
    """Whether the kernel multiplies codes in fp16 pairs on `device`: a GPU of compute capability
    8.0 or later (A100, the RTX 30/40 cards, Hopper), which `cvt.rn.f16x2.f32` needs."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def step_dot_ptx(bits: int) -> str:
    """PTX for Σ x·q·2⁻⁶ over the codes of one step of the kernel: `bits` packed words (4 at 4
    bits, 2 at 2 bits: 32 codes, 16 in each fp16 lane), two codes per fp16x2 instruction.

    Operands: $0 the fp32 result, $1..$bits the words, then per word its pairs (x_j, x_{j+half}) as
    fp16x2 (`_x_pair`), j in code order. OR-ed into the exponent bits of the fp16 1024, the code at
    bit offset o of each half-word reads as 1024 + q·2ᵒ (one LOP3 for two codes); one FMA by
    2⁻⁽ᵒ⁺⁶⁾ and −2⁴⁻ᵒ makes it q·2⁻⁶ exactly, and one FMA adds x·q·2⁻⁶ into the lane's sum. Offsets
    0..7 come from the word, 8..15 from the word shifted down 8 bits. The 2⁻⁶ keeps a lane's fp16
    sum finite up to Σ|x| ≈ 279,000 over its 16 inputs at 4 bits (1.4 million at 2 bits). The two
    lane sums are added in fp32.
    """
    mask = (1 << bits) - 1
    offsets = range(0, 8, bits)
    lines = ["mov.b32 k, 0x64006400;"]
    for offset in offsets:  # fp16 bits of 2⁻⁽ᵒ⁺⁶⁾ and of −1024·2⁻⁽ᵒ⁺⁶⁾, in both halves
        scale, minus = (15 - CODE_SHIFT - offset) << 10, 0x8000 | (25 - CODE_SHIFT - offset) << 10
        lines += [
            f"mov.b32 s{offset}, {scale << 16 | scale:#010x};",
            f"mov.b32 m{offset}, {minus << 16 | minus:#010x};",
        ]
    pair = 0
    for word in (f"${w + 1}" for w in range(bits)):
        lines.append(f"shr.u32 w8, {word}, 8;")
        for source in (word, "w8"):
            for offset in offsets:
                field = mask << offset
                x = f"${bits + 1 + pair}"
                lines += [
                    f"lop3.b32 q, {source}, {field << 16 | field:#010x}, k, 0xea;",
                    f"fma.rn.f16x2 q, q, s{offset}, m{offset};",
                    f"mul.rn.f16x2 acc, {x}, q;" if pair == 0 else f"fma.rn.f16x2 acc, {x}, q, acc;",
                ]
                pair += 1
    lines += [
        "mov.b32 {lo, hi}, acc;",
        "cvt.f32.f16 f_lo, lo;",
        "cvt.f32.f16 f_hi, hi;",
        "add.f32 $0, f_lo, f_hi;",
    ]
    registers = [
        f".reg .b32 k, w8, acc, q, {', '.join(f's{o}, m{o}' for o in offsets)};",
        ".reg .b16 lo, hi;",
        ".reg .f32 f_lo, f_hi;",
    ]
    return "{\n" + "\n".join(registers + lines) + "\n}"


if triton_available():
    import triton
    import triton.language as tl

    from gpu_kernels._pdl import wait_for_inputs

    @triton.jit
    def add_split(part, acc_ptrs, y_ptrs, arrivals_ptr, mask, n_splits):
        """Add this program's partial sums into the zeroed workspace; the last of `n_splits`
        programs to arrive at the block writes the total to y (in y's dtype) and zeroes the block's
        sums and its arrival counter again."""
        # Relaxed adds: the barrier and the counter's acquire-release order them for the last program.
        tl.atomic_add(acc_ptrs, part, mask=mask, sem="relaxed")
        tl.debug_barrier()  # every thread's add is done before the program counts as arrived
        if tl.atomic_add(arrivals_ptr, 1) == n_splits - 1:
            # An atomic read sees every add at L2; then zero the sums with plain stores (nothing else
            # touches the block now; an atomic exchange of floats would not run in the interpreter).
            total = tl.atomic_add(acc_ptrs, 0.0, mask=mask)
            tl.store(acc_ptrs, 0.0, mask=mask)
            tl.store(y_ptrs, total.to(y_ptrs.dtype.element_ty), mask=mask)
            tl.atomic_xchg(arrivals_ptr, 0)

    @triton.jit
    def _load_word(word_ptrs, w, w_end, offs_n, n_mask, N, stride_qk, EVEN: tl.constexpr):
        """Packed word w of the tile's columns as uint32 (0 past the split or the columns)."""
        if EVEN:
            mask = n_mask
        else:
            # offs_n < N unless the word is past the split, which Triton's interpreter cannot
            # write as n_mask & (scalar condition): it types that mask int32
            mask = offs_n < tl.where(w < w_end, N, 0)
        # read once: leave L2 to x and the sums
        word = tl.load(word_ptrs + w * stride_qk, mask=mask, other=0, eviction_policy="evict_first")
        return word.to(tl.uint32, bitcast=True)

    @triton.jit
    def _load_x(x_ptr, k, left, EVEN: tl.constexpr):
        """Input value k as fp32; past `left` (the end of the split or of x) it is 0."""
        if EVEN:
            x = tl.load(x_ptr + k)
        else:
            x = tl.load(x_ptr + k, mask=k < left, other=0.0)
        return x.to(tl.float32)

    @triton.jit
    def _x_pair(x_ptr, j, HALF: tl.constexpr, left, EVEN: tl.constexpr):
        """(x_j, x_{j+HALF}) as one register of two fp16 halves, x_j in the low half (the halves of
        a word hold codes j and j + HALF), and x_j + x_{j+HALF} in fp32. Inputs beyond fp16's
        ±65,504 would pack as infinities; activations stay far below that."""
        lo, hi = _load_x(x_ptr, j, left, EVEN), _load_x(x_ptr, j + HALF, left, EVEN)
        pair = tl.inline_asm_elementwise(
            "cvt.rn.f16x2.f32 $0, $1, $2;", "=r,f,f", [hi, lo], dtype=tl.uint32, is_pure=True, pack=1
        )
        return pair, lo + hi

    @triton.jit
    def _x_pairs(x_ptr, J: tl.constexpr, HALF: tl.constexpr, left, EVEN: tl.constexpr):
        """Pairs J..J+3 (`_x_pair`) and the sum of their eight inputs."""
        p0, s0 = _x_pair(x_ptr, J, HALF, left, EVEN)
        p1, s1 = _x_pair(x_ptr, J + 1, HALF, left, EVEN)
        p2, s2 = _x_pair(x_ptr, J + 2, HALF, left, EVEN)
        p3, s3 = _x_pair(x_ptr, J + 3, HALF, left, EVEN)
        return p0, p1, p2, p3, s0 + s1 + s2 + s3

    UNDO_CODE_SHIFT = tl.constexpr(float(1 << CODE_SHIFT))
    STEP_DOT_4BIT_PTX = tl.constexpr(step_dot_ptx(4))
    STEP_DOT_2BIT_PTX = tl.constexpr(step_dot_ptx(2))

    @triton.jit
    def _step_dot_4bit(w0, w1, w2, w3, p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11, p12, p13, p14, p15):
        return tl.inline_asm_elementwise(
            STEP_DOT_4BIT_PTX, "=f,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r",
            [w0, w1, w2, w3, p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11, p12, p13, p14, p15],
            dtype=tl.float32, is_pure=True, pack=1,
        )  # fmt: skip

    @triton.jit
    def _step_dot_2bit(w0, w1, p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11, p12, p13, p14, p15):
        return tl.inline_asm_elementwise(
            STEP_DOT_2BIT_PTX, "=f,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r",
            [w0, w1, p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11, p12, p13, p14, p15],
            dtype=tl.float32, is_pure=True, pack=1,
        )  # fmt: skip

    @triton.jit
    def _gptq_gemv_kernel(
        x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, y_ptr, acc_ptr, arrivals_ptr,
        K, N, zero_offset, group_size, words_per_split, n_splits, exponent_bits,
        stride_xm, stride_ym, stride_qk, stride_qn, stride_zg, stride_zn, stride_sg, stride_sn,
        BITS: tl.constexpr, ATOMIC: tl.constexpr, EVEN: tl.constexpr, BLOCK_W: tl.constexpr,
        BLOCK_N: tl.constexpr, HALF2: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        """Program (n, s, m): row m, columns [n·BLOCK_N, (n+1)·BLOCK_N), packed words of split s.

        Every tensor is a row of BLOCK_N columns and every input value a scalar: a thread holds a few
        columns and walks the tile's words and codes in unrolled loops, so no value ever moves
        between threads (a [words, columns] tile made Triton convert the input vector's layout
        through shared memory, with two barriers, for every code position).
        """
        PACK: tl.constexpr = 32 // BITS
        HALF: tl.constexpr = PACK // 2
        MASK: tl.constexpr = (1 << BITS) - 1
        wait_for_inputs(PDL)
        pid_n, pid_s, row = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        zero_shift = ((offs_n % PACK) * BITS).to(tl.uint32)
        w_begin = pid_s * words_per_split
        w_end = tl.minimum(w_begin + words_per_split, (K + PACK - 1) // PACK)
        x_row = x_ptr + row * stride_xm
        word_ptrs = qweight_ptr + offs_n * stride_qn
        acc = tl.full((BLOCK_N,), 0.0, tl.float32)
        for w_start in range(w_begin, w_end, BLOCK_W):
            g = (w_start * PACK) // group_size  # the whole tile lies in this group
            zero_word = tl.load(qzeros_ptr + g * stride_zg + offs_n // PACK * stride_zn, mask=n_mask, other=0)
            zero_code = (zero_word.to(tl.uint32, bitcast=True) >> zero_shift) & MASK
            zeros = zero_code.to(tl.float32) + zero_offset
            scales = tl.load(scales_ptr + g * stride_sg + offs_n * stride_sn, mask=n_mask, other=0.0)
            dot = tl.full((BLOCK_N,), 0.0, tl.float32)  # sum of x·q over the tile
            x_sum = 0.0  # sum of x over the tile, for the zero point
            x_tile = x_row + w_start * PACK
            x_left = tl.minimum(w_end * PACK, K) - w_start * PACK  # inputs of this tile inside split and x
            if HALF2:  # steps of BITS words: 16 input pairs, x_j and x_{j+HALF} of a word in each
                for i in tl.static_range(0, BLOCK_W, BITS):
                    w0 = _load_word(word_ptrs, w_start + i, w_end, offs_n, n_mask, N, stride_qk, EVEN)
                    w1 = _load_word(word_ptrs, w_start + i + 1, w_end, offs_n, n_mask, N, stride_qk, EVEN)
                    if BITS == 4:
                        w2 = _load_word(word_ptrs, w_start + i + 2, w_end, offs_n, n_mask, N, stride_qk, EVEN)
                        w3 = _load_word(word_ptrs, w_start + i + 3, w_end, offs_n, n_mask, N, stride_qk, EVEN)
                    # pairs 4c..4c+3 of the step lie in word i + 4c // HALF, from its pair 4c % HALF
                    p0, p1, p2, p3, s0 = _x_pairs(x_tile, i * PACK, HALF, x_left, EVEN)
                    p4, p5, p6, p7, s1 = _x_pairs(
                        x_tile, (i + 4 // HALF) * PACK + 4 % HALF, HALF, x_left, EVEN
                    )
                    p8, p9, p10, p11, s2 = _x_pairs(
                        x_tile, (i + 8 // HALF) * PACK + 8 % HALF, HALF, x_left, EVEN
                    )
                    p12, p13, p14, p15, s3 = _x_pairs(
                        x_tile, (i + 12 // HALF) * PACK + 12 % HALF, HALF, x_left, EVEN
                    )
                    if BITS == 4:
                        dot += _step_dot_4bit(
                            w0, w1, w2, w3,
                            p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11, p12, p13, p14, p15,
                        )  # fmt: skip
                    else:
                        dot += _step_dot_2bit(
                            w0, w1,
                            p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11, p12, p13, p14, p15,
                        )  # fmt: skip
                    x_sum += s0 + s1 + s2 + s3
                dot *= UNDO_CODE_SHIFT
            else:
                # Each half-word under the exponent bits of 2²³; one AND with a constant then cuts
                # a code out in place as a float. The low half keeps the high half's bits too: the
                # AND clears them (except the exponent bits, which the OR set).
                exponent = exponent_bits.to(tl.uint32)
                for i in tl.static_range(BLOCK_W):
                    word = _load_word(word_ptrs, w_start + i, w_end, offs_n, n_mask, N, stride_qk, EVEN)
                    halves = (word | exponent, (word >> 16) | exponent)
                    for j in tl.static_range(PACK):
                        SHIFT = (j % HALF) * BITS  # a constexpr: j is
                        x = _load_x(x_tile + i * PACK, j, x_left - i * PACK, EVEN)
                        x_sum += x
                        in_place = halves[j // HALF] & (0x4B000000 | (MASK << SHIFT))
                        code = in_place.to(tl.float32, bitcast=True) - 8388608.0  # q·2ᵖ
                        dot += (x * (1.0 / (1 << SHIFT))) * code
            acc += scales.to(tl.float32) * (dot - zeros * x_sum)
        y_ptrs = y_ptr + row * stride_ym + offs_n
        if ATOMIC:  # the reduction is split over programs: add this split's part
            arrivals = arrivals_ptr + row * tl.num_programs(0) + pid_n
            add_split(acc, acc_ptr + row * N + offs_n, y_ptrs, arrivals, n_mask, n_splits)
        else:
            tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=n_mask)


def gemv_candidates(in_features: int, out_features: int, bits: int, tile_words: int) -> list[dict[str, int]]:
    """Tiles and reduction splits worth timing for this shape (the first is the default).

    The kernel is limited by its instructions per code and by the fixed cost of each program (setup,
    atomic adds): wider column blocks per thread share each input value's load and conversion over
    more columns, and a program covering a few tiles spreads its setup and its atomic adds over more
    codes.
    """
    words = -(-in_features * bits // 32)
    shapes = ((512, 2), (1024, 4), (2048, 4)) if bits > 2 else ((256, 2), (512, 4), (1024, 4))
    candidates = []
    for block_w in sorted({min(tile_words, 4), min(tile_words, 8)}):
        for split in (128, 64, 32):
            split = max(1, min(split, words // block_w))
            for block_n, warps in shapes:
                config = dict(BLOCK_W=block_w, BLOCK_N=block_n, SPLIT_K=split, num_warps=warps)
                if config not in candidates:  # small weights clamp the splits to the same one
                    candidates.append(config)
    # The same tiles under a register cap: more resident warps keep more loads in flight, which
    # made the one-row products at 7B's shapes faster; the timing decides per shape.
    return candidates + [dict(config, maxnreg=GEMV_MAX_REGISTERS) for config in candidates]


def words_per_split(words: int, split: int, block_w: int) -> int:
    """Packed words per program for about `split` programs per column block: a multiple of the
    tile, and a divisor of `words` where one is near, so that no program needs bounds checks."""
    target = max(block_w, words // split // block_w * block_w)
    for per_split in range(target, max(block_w, target // 2) - 1, -block_w):
        if words % per_split == 0:
            return per_split
    per_split = -(-words // split)
    return -(-per_split // block_w) * block_w


def gemv_supports(bits: int, g_idx: torch.Tensor, scales: torch.Tensor) -> bool:
    """Whether the kernel can run this weight: 2/4/8 bits and contiguous groups of whole words."""
    return gemv_tile_words(bits, contiguous_group_size(g_idx, scales.shape[0]), scales.shape[0]) > 0


def gptq_gemv(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    zero_offset: int = 1,
    config: dict[str, int] | None = None,
) -> torch.Tensor:
    """x [..., in] -> x·Wᵀ [..., out] in x's dtype (see `gemv_supports` for the weights it takes).

    `config` fixes the tile (BLOCK_W, BLOCK_N, SPLIT_K, num_warps, optionally maxnreg); by default
    the fastest of `gemv_candidates` for this shape, timed on first use.
    """
    in_features, out_features = g_idx.shape[0], scales.shape[1]
    group_size = contiguous_group_size(g_idx, scales.shape[0])
    tile_words = gemv_tile_words(bits, group_size, scales.shape[0])
    if not tile_words:
        raise ValueError(
            f"bits={bits}, g_idx: the decode kernel takes {GEMV_BITS} bits and contiguous groups"
            " of whole packed words"
        )
    if x.shape[-1] != in_features:
        raise ValueError(f"x: last dim {x.shape[-1]} must be in_features={in_features}")
    x2 = x.reshape(-1, in_features)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]

    def launch(cfg: dict[str, int]) -> torch.Tensor:
        cfg = dict(cfg)
        words = qweight.shape[0]
        per_split = words_per_split(words, cfg.pop("SPLIT_K"), cfg["BLOCK_W"])
        split = triton.cdiv(words, per_split)
        blocks = triton.cdiv(out_features, cfg["BLOCK_N"])
        y = torch.empty(rows, out_features, dtype=x.dtype, device=x.device)
        acc, arrivals = split_k_workspace(x.device, rows * out_features, rows * blocks)
        launchable(_gptq_gemv_kernel)[(blocks, split, rows)](
            x2, qweight, qzeros, scales, y, acc, arrivals,
            in_features, out_features, zero_offset, group_size, per_split, split, EXPONENT_BITS,
            x2.stride(0), y.stride(0), *qweight.stride(), *qzeros.stride(), *scales.stride(),
            BITS=bits, ATOMIC=split > 1,
            HALF2=bits in HALF2_BITS and fp16_pairs(x.device) and cfg["BLOCK_W"] % bits == 0,
            EVEN=words % per_split == 0 and in_features % (32 // bits) == 0,
            **cfg, **dependent_launch(x.device),
        )  # fmt: skip
        return y

    if config is None:
        key = ("gptq_gemv", rows, in_features, out_features, bits, group_size, x.dtype)
        candidates = gemv_candidates(in_features, out_features, bits, tile_words)
        config = fastest_config(key, candidates, launch, x.device)
    return launch(config).view(*x.shape[:-1], out_features)
