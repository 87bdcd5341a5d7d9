"""Materialize a GPTQ-packed weight into a dense [out_features, in_features] matrix.

Layout (AutoGPTQ / GPTQModel checkpoints, shared by every integer quantizer here):
- `qweight` int32 [in_features * bits / 32, out_features]: codes packed along the input dim as a
  little-endian bit stream, `bits` bits per code. For 3 bits a code can straddle two words
  (codes 10 and 21 of every 32), which is GPTQ's "three words hold 32 codes" layout.
- `qzeros` int32 [n_groups, out_features * bits / 32]: zero points packed the same way along the
  output dim. Format v1 stores `zero - 1` (`zero_offset=1`), format v2 stores `zero` (`zero_offset=0`).
- `scales` float16/bfloat16/float32 [n_groups, out_features].
- `g_idx` int32 [in_features]: the group of each input channel (act-order permutes it).

W[o, i] = scales[g, o] * (code[i, o] - zero[g, o]) with g = g_idx[i].

The kernel writes far more than it reads (2 bytes per code against 2-4 bits), so it must keep the
stores streaming with few instructions per code: where a tile lies in one group, each thread
expands whole units of 32 codes (`bits` words of one column) with constant shifts and masks, three
instructions per code (`_scaled_code`), and writes each unit as 64 contiguous bytes.
"""

import weakref

import torch

from gpu_kernels._dispatch import fastest_config, launchable, triton_available, use_triton


def unpack_bits_ref(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Unpack `count` codes along dim 0 of an int32 bit stream [words, N] into int32 [count, N]."""
    words = packed.to(torch.int64) & 0xFFFFFFFF  # unsigned view of each 32-bit word
    positions = torch.arange(count, device=packed.device) * bits
    word, shift = positions // 32, positions % 32
    low = words[word] >> shift[:, None]
    # A code that straddles a word boundary takes its high bits from the next word.
    nxt = torch.clamp(word + 1, max=words.shape[0] - 1)
    high = words[nxt] << (32 - shift)[:, None]
    straddles = (shift + bits > 32)[:, None]
    codes = torch.where(straddles, low | high, low) & ((1 << bits) - 1)
    return codes.to(torch.int32)


def materialize_gptq_ref(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    zero_offset: int = 1,
    dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """Dense W [out_features, in_features] in `dtype` from the packed GPTQ tensors."""
    in_features, out_features = g_idx.shape[0], scales.shape[1]
    codes = unpack_bits_ref(qweight, bits, in_features)  # [in, out]
    zeros = unpack_bits_ref(qzeros.T.contiguous(), bits, out_features).T + zero_offset  # [groups, out]
    g = g_idx.long()
    w = (codes - zeros[g]).to(torch.float32) * scales[g].to(torch.float32)  # [in, out]
    return w.T.contiguous().to(dtype)


def materialize_gptq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    zero_offset: int = 1,
    dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """Dense W [out_features, in_features]; Triton on CUDA, the reference elsewhere."""
    if use_triton(qweight):
        return materialize_gptq_triton(qweight, qzeros, scales, g_idx, bits, zero_offset, dtype)
    return materialize_gptq_ref(qweight, qzeros, scales, g_idx, bits, zero_offset, dtype)


# --- Triton -------------------------------------------------------------------------------------

# The exponent bits of the float 2²³: a code in the low mantissa bits under them is the float
# 2²³ + code. Kernels take them as an argument: as a literal, the compiler folds them into every
# code's AND, which then needs a second constant in a register, rebuilt per code.
EXPONENT_BITS = 0x4B000000

_group_cache: dict[int, tuple[int, int]] = {}  # id(g_idx) -> (g_idx._version, contiguous group size or 0)


def contiguous_group_size(g_idx: torch.Tensor, n_groups: int) -> int:
    """The group size if g_idx[i] == i // group_size (no act-order), else 0 (g_idx must be gathered).

    The answer needs one device sync, so it is remembered per g_idx tensor (a layer's buffer lives
    as long as the layer) and recomputed when the tensor is modified in place.
    """
    key, version = id(g_idx), g_idx._version
    cached = _group_cache.get(key)
    if cached is not None and cached[0] == version:
        return cached[1]
    in_features = g_idx.shape[0]
    group_size = int((g_idx == 0).sum()) if n_groups > 1 else in_features
    expected = torch.arange(in_features, device=g_idx.device) // group_size
    result = group_size if torch.equal(g_idx.long(), expected) else 0
    if cached is None:
        weakref.finalize(g_idx, _group_cache.pop, key, None)
    _group_cache[key] = (version, result)
    return result


if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _load_codes(ptr, idx, col_offset, stride_word, mask, BITS: tl.constexpr):
        """uint32 codes number `idx` of the bit streams that start at ptr + col_offset."""
        pos = idx * BITS
        word, shift = pos // 32, (pos % 32).to(tl.uint32)
        low = tl.load(ptr + word * stride_word + col_offset, mask=mask, other=0).to(tl.uint32, bitcast=True)
        codes = low >> shift
        if 32 % BITS != 0:  # 3-bit codes 10 and 21 of every 32 take their high bits from the next word
            straddles = shift + BITS > 32
            high = tl.load(ptr + (word + 1) * stride_word + col_offset, mask=mask & straddles, other=0)
            high = high.to(tl.uint32, bitcast=True)
            codes = codes | (high << tl.where(straddles, 32 - shift, 0))
        return codes & ((1 << BITS) - 1)

    @triton.jit
    def _triplet_word(ptr, ti, tn, i, n_words, N, stride_qk, stride_qn, TRANSPOSED: tl.constexpr):
        """Word i of each triplet ti, columns tn, with a unit axis where the 32 codes will go."""
        mask = (3 * ti + i < n_words) & (tn < N)
        word = tl.load(ptr + (3 * ti + i) * stride_qk + tn * stride_qn, mask=mask, other=0)
        word = word.to(tl.uint32, bitcast=True)
        return word[:, :, None] if TRANSPOSED else word[:, None, :]

    @triton.jit
    def _three_bit_codes(
        qweight_ptr, offs_n, k_start, K, N, stride_qk, stride_qn,
        TRANSPOSED: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        """uint32 3-bit codes k_start..k_start+BLOCK_K-1 (k_start a multiple of 32) of columns offs_n,
        as [k, n] (or [n, k] when TRANSPOSED).

        Three words hold 32 codes; code j sits at bit 3j of the triplet, so codes 10 and 21 take bits
        from two words. Each word of the tile is loaded once and every code is cut out of its
        triplet by constant shifts and selects, instead of a load per code.
        """
        TRIPLETS: tl.constexpr = BLOCK_K // 32
        offs_t = k_start // 32 + tl.arange(0, TRIPLETS)
        j = tl.arange(0, 32)
        word_of = (j * 3) // 32  # which word of the triplet holds the code's low bit
        shift = ((j * 3) % 32).to(tl.uint32)
        straddles = shift > 29
        n_words = (3 * K + 31) // 32
        if TRANSPOSED:  # [n, triplet, code]
            ti, tn = offs_t[None, :], offs_n[:, None]
            word_of, shift, straddles = word_of[None, None, :], shift[None, None, :], straddles[None, None, :]
        else:  # [triplet, code, n]
            ti, tn = offs_t[:, None], offs_n[None, :]
            word_of, shift, straddles = word_of[None, :, None], shift[None, :, None], straddles[None, :, None]
        w0 = _triplet_word(qweight_ptr, ti, tn, 0, n_words, N, stride_qk, stride_qn, TRANSPOSED)
        w1 = _triplet_word(qweight_ptr, ti, tn, 1, n_words, N, stride_qk, stride_qn, TRANSPOSED)
        w2 = _triplet_word(qweight_ptr, ti, tn, 2, n_words, N, stride_qk, stride_qn, TRANSPOSED)
        low = tl.where(word_of == 0, w0, tl.where(word_of == 1, w1, w2))
        high = tl.where(word_of == 0, w1, w2)
        codes = (low >> shift) | tl.where(straddles, high << tl.where(straddles, 32 - shift, 0), 0)
        codes = codes & 7
        if TRANSPOSED:
            codes = tl.reshape(codes, (codes.shape[0], BLOCK_K))
        else:
            codes = tl.reshape(codes, (BLOCK_K, codes.shape[2]))
        return codes

    @triton.jit
    def dequant_gptq_tile(
        qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr,
        offs_k, offs_n, k_start, K, N, zero_offset, group_size,
        stride_qk, stride_qn, stride_zg, stride_zn, stride_sg, stride_sn,
        BITS: tl.constexpr, ONE_GROUP: tl.constexpr, TRANSPOSED: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        """fp32 W[n, k] for the tile, laid out [k, n] (or [n, k] when TRANSPOSED).

        offs_k must be k_start + arange(BLOCK_K) with k_start a multiple of BLOCK_K's code-per-word
        count (tiles are aligned), so 2/4/8-bit tiles start on a word.

        ONE_GROUP: every k of the tile is in group k_start // group_size (no act-order and tiles
        aligned to groups), so scales and zeros are one row each instead of a gather per element.
        """
        if TRANSPOSED:
            ki, ni = offs_k[None, :], offs_n[:, None]
        else:
            ki, ni = offs_k[:, None], offs_n[None, :]
        mask = (ki < K) & (ni < N)
        if 32 % BITS == 0:
            # Whole codes per word (2/4/8 bits): load each word once and expand it by constant shifts,
            # instead of one load and one position computation per code.
            offs_w = k_start // (32 // BITS) + tl.arange(0, BLOCK_K // (32 // BITS))
            shifts = (tl.arange(0, 32 // BITS) * BITS).to(tl.uint32)
            if TRANSPOSED:
                wi, wn = offs_w[None, :], offs_n[:, None]
            else:
                wi, wn = offs_w[:, None], offs_n[None, :]
            w_mask = (wi * (32 // BITS) < K) & (wn < N)
            words = tl.load(qweight_ptr + wi * stride_qk + wn * stride_qn, mask=w_mask, other=0)
            words = words.to(tl.uint32, bitcast=True)
            if TRANSPOSED:  # [n, word, code in word] -> [n, k]
                codes = (words[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)
                codes = tl.reshape(codes, (codes.shape[0], BLOCK_K))
            else:  # [word, code in word, n] -> [k, n]
                codes = (words[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)
                codes = tl.reshape(codes, (BLOCK_K, codes.shape[2]))
        elif BLOCK_K % 32 == 0:
            codes = _three_bit_codes(
                qweight_ptr, offs_n, k_start, K, N, stride_qk, stride_qn, TRANSPOSED, BLOCK_K
            )
        else:  # 3 bits in a tile narrower than a word triplet: each code computes its own position
            codes = _load_codes(qweight_ptr, ki, ni * stride_qn, stride_qk, mask, BITS)
        if ONE_GROUP:
            g = k_start // group_size
            n_mask = offs_n < N
            zeros = _load_codes(qzeros_ptr, offs_n, g * stride_zg, stride_zn, n_mask, BITS)
            scales = tl.load(scales_ptr + g * stride_sg + offs_n * stride_sn, mask=n_mask, other=0.0)
            if TRANSPOSED:
                zeros, scales = zeros[:, None], scales[:, None]
            else:
                zeros, scales = zeros[None, :], scales[None, :]
        else:
            g = tl.load(g_idx_ptr + ki, mask=ki < K, other=0)
            zeros = _load_codes(qzeros_ptr, ni, g * stride_zg, stride_zn, mask, BITS)
            scales = tl.load(scales_ptr + g * stride_sg + ni * stride_sn, mask=mask, other=0.0)
        q = codes.to(tl.int32) - (zeros.to(tl.int32) + zero_offset)
        return q.to(tl.float32) * scales.to(tl.float32)

    @triton.jit
    def _unit_word(
        qweight_ptr, offs_t, offs_n, n_words, N, stride_qk, stride_qn, A: tl.constexpr, BITS: tl.constexpr
    ):
        """Word A of each 32-code unit (BITS words) offs_t, columns offs_n, as uint32 [n, unit]."""
        row = offs_t[None, :] * BITS + A
        mask = (row < n_words) & (offs_n[:, None] < N)
        if A < BITS:
            word = tl.load(qweight_ptr + row * stride_qk + offs_n[:, None] * stride_qn, mask=mask, other=0)
        else:  # past the unit: never read
            word = tl.full(mask.shape, 0, tl.int32)
        return word.to(tl.uint32, bitcast=True)

    @triton.jit
    def _scaled_code(words, zeros, scales, exponent, J: tl.constexpr, BITS: tl.constexpr):
        """Code J of the units held in `words`, dequantized: fp32 [n, unit].

        The code is cut out in place under the exponent bits of 2²³ (`exponent`, an argument so the
        compiler keeps one constant per mask): one AND gives the float 2²³ + q·2ᵖ, one subtraction
        of 2²³ + z·2ᵖ the exact (q - z)·2ᵖ, one multiply by s·2⁻ᵖ the weight, as the reference
        rounds it. A code above the 23 mantissa bits is cut from the word shifted down 16 bits; a
        3-bit code that straddles two words is shifted together first.
        """
        MASK: tl.constexpr = (1 << BITS) - 1
        A: tl.constexpr = J * BITS // 32
        P: tl.constexpr = J * BITS % 32
        STRADDLES: tl.constexpr = P + BITS > 32
        HIGH: tl.constexpr = P + BITS > 23 and not STRADDLES
        Q: tl.constexpr = 0 if STRADDLES else (P - 16 if HIGH else P)
        if STRADDLES:
            in_place = (((words[A] >> P) | (words[A + 1] << (32 - P))) & MASK) | exponent
        elif HIGH:
            in_place = ((words[A] >> 16) | exponent) & (exponent | (MASK << Q))
        else:
            in_place = (words[A] | exponent) & (exponent | (MASK << Q))
        zero = zeros * (1 << Q) + 8388608.0
        return (in_place.to(tl.float32, bitcast=True) - zero) * (scales * (1.0 / (1 << Q)))

    @triton.jit
    def _scaled_codes(
        words, zeros, scales, exponent, J: tl.constexpr, STRIDE: tl.constexpr, COUNT: tl.constexpr,
        BITS: tl.constexpr,
    ):  # fmt: skip
        """Codes J, J + STRIDE, ... (COUNT of them) of the units, dequantized: [n, unit, 2, ..., 2].

        Joined pairwise, so each thread holds its units' codes and every shift and mask above is a
        constant. A join appends the pair's axis last, so the outer join pairs even and odd codes
        and the flattened axes come out in code order.
        """
        if COUNT == 1:
            return _scaled_code(words, zeros, scales, exponent, J, BITS)
        else:
            return tl.join(
                _scaled_codes(words, zeros, scales, exponent, J, 2 * STRIDE, COUNT // 2, BITS),
                _scaled_codes(words, zeros, scales, exponent, J + STRIDE, 2 * STRIDE, COUNT // 2, BITS),
            )

    @triton.jit
    def _materialize_gptq_kernel(
        qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, out_ptr,
        K, N, zero_offset, group_size, exponent_bits,
        stride_qk, stride_qn, stride_zg, stride_zn, stride_sg, stride_sn, stride_on, stride_ok,
        BITS: tl.constexpr, ONE_GROUP: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        k_start = tl.program_id(0) * BLOCK_K
        offs_k = k_start + tl.arange(0, BLOCK_K)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        if ONE_GROUP:
            # Units of 32 codes (BITS words), each expanded by one thread with constant shifts.
            offs_t = k_start // 32 + tl.arange(0, BLOCK_K // 32)
            n_words = (K * BITS + 31) // 32
            words = (
                _unit_word(qweight_ptr, offs_t, offs_n, n_words, N, stride_qk, stride_qn, 0, BITS),
                _unit_word(qweight_ptr, offs_t, offs_n, n_words, N, stride_qk, stride_qn, 1, BITS),
                _unit_word(qweight_ptr, offs_t, offs_n, n_words, N, stride_qk, stride_qn, 2, BITS),
                _unit_word(qweight_ptr, offs_t, offs_n, n_words, N, stride_qk, stride_qn, 3, BITS),
                _unit_word(qweight_ptr, offs_t, offs_n, n_words, N, stride_qk, stride_qn, 4, BITS),
                _unit_word(qweight_ptr, offs_t, offs_n, n_words, N, stride_qk, stride_qn, 5, BITS),
                _unit_word(qweight_ptr, offs_t, offs_n, n_words, N, stride_qk, stride_qn, 6, BITS),
                _unit_word(qweight_ptr, offs_t, offs_n, n_words, N, stride_qk, stride_qn, 7, BITS),
            )
            g = k_start // group_size
            n_mask = offs_n < N
            zero_codes = _load_codes(qzeros_ptr, offs_n, g * stride_zg, stride_zn, n_mask, BITS)
            zeros = (zero_codes.to(tl.float32) + zero_offset)[:, None]
            scales = tl.load(scales_ptr + g * stride_sg + offs_n * stride_sn, mask=n_mask, other=0.0)
            scales = scales.to(tl.float32)[:, None]
            exponent = exponent_bits.to(tl.uint32)
            w = _scaled_codes(words, zeros, scales, exponent, 0, 1, 32, BITS)
            w = tl.reshape(w, (BLOCK_N, BLOCK_K))
        else:  # the tile crosses groups (act-order, or groups smaller than the tile): gather per element
            w = dequant_gptq_tile(
                qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, offs_k, offs_n, k_start, K, N, zero_offset,
                group_size, stride_qk, stride_qn, stride_zg, stride_zn, stride_sg, stride_sn,
                BITS, ONE_GROUP, True, BLOCK_K,
            )  # fmt: skip
        # w is [BLOCK_N, BLOCK_K]: the output is [out, in], contiguous along in.
        mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
        out = out_ptr + offs_n[:, None] * stride_on + offs_k[None, :] * stride_ok
        tl.store(out, w.to(out_ptr.dtype.element_ty), mask=mask)


# (BLOCK_K, BLOCK_N, num_warps) timed on first use per shape; the first is the default elsewhere.
# 128x64 with 4 warps (two units of 32 codes per thread) and 128x128 with 8 are the fastest at 2, 3
# and 4 bits on 7B's and 65B's shapes, close to each other. Tiles that lose when the weight streams
# from HBM are left out: the pick times one weight, which may stay in L2, and could choose them.
# 128x32 with 2 warps is for weights that make few tiles (4096x4096: two waves of 128x64 programs).
# Tiles of 256 inputs stay in one group for groups of 256 or more (or one per row).
MATERIALIZE_TILES = [(128, 64, 4), (128, 128, 8), (128, 32, 2), (256, 64, 8)]
_CANDIDATES = [dict(BLOCK_K=k, BLOCK_N=n, num_warps=w) for k, n, w in MATERIALIZE_TILES]


def materialize_gptq_triton(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    zero_offset: int = 1,
    dtype: torch.dtype = torch.float16,
    config: dict[str, int] | None = None,
) -> torch.Tensor:
    """The Triton kernel behind `materialize_gptq` (same arguments and result); `config` fixes
    BLOCK_K, BLOCK_N and num_warps, by default the fastest of MATERIALIZE_TILES for this shape."""
    in_features, out_features = g_idx.shape[0], scales.shape[1]
    group_size = contiguous_group_size(g_idx, scales.shape[0])

    def launch(cfg: dict[str, int]) -> torch.Tensor:
        one_group = group_size > 0 and (scales.shape[0] == 1 or group_size % cfg["BLOCK_K"] == 0)
        out = torch.empty(out_features, in_features, dtype=dtype, device=qweight.device)
        grid = (triton.cdiv(in_features, cfg["BLOCK_K"]), triton.cdiv(out_features, cfg["BLOCK_N"]))
        launchable(_materialize_gptq_kernel)[grid](
            qweight, qzeros, scales, g_idx, out,
            in_features, out_features, zero_offset, max(group_size, 1), EXPONENT_BITS,
            *qweight.stride(), *qzeros.stride(), *scales.stride(), *out.stride(),
            BITS=bits, ONE_GROUP=one_group, **cfg,
        )  # fmt: skip
        return out

    if config is None:
        key = ("materialize_gptq", in_features, out_features, bits, group_size, dtype)
        config = fastest_config(key, _CANDIDATES, launch, qweight.device)
    return launch(config)
