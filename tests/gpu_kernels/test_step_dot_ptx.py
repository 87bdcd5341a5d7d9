"""The fp16-pair PTX of the one-row kernel, run by a small PTX emulator (CI has no GPU to run it on).

`step_dot_ptx` is what a GPU executes for each step of packed words at 2 and 4 bits; Triton's
interpreter runs the kernel's fp32 form instead, so without this test CI would never check the
constants and fields that the generator writes. The emulator knows exactly the instructions the
generator emits and rounds every fp16x2 operation once, as the hardware does.
"""

import re

import numpy as np
import pytest

from gpu_kernels.gptq_gemv import CODE_SHIFT, step_dot_ptx


def _halves(value: int) -> np.ndarray:
    return np.array([value & 0xFFFF, value >> 16], dtype=np.uint16).view(np.float16)


def _word(halves: np.ndarray) -> int:
    low, high = halves.astype(np.float16).view(np.uint16).astype(int)
    return int(low) | int(high) << 16


def run_ptx(ptx: str, operands: dict[str, int]) -> float:
    """Execute the generated block; registers hold 32-bit ints, operands are `$1`, `$2`, ..."""
    regs: dict[str, object] = dict(operands)
    value = lambda token: regs[token] if token in regs else int(token, 0)  # noqa: E731
    for line in ptx.splitlines():
        line = line.strip().rstrip(";")
        if not line or line[0] in "{}." or line.startswith(".reg"):
            continue
        op, args = line.split(None, 1)
        args = [a.strip() for a in re.split(r",(?![^{]*})", args)]
        if op == "mov.b32" and args[0].startswith("{"):
            lo, hi = args[0].strip("{}").replace(" ", "").split(",")
            regs[lo], regs[hi] = _halves(value(args[1]))
        elif op == "mov.b32":
            regs[args[0]] = value(args[1])
        elif op == "shr.u32":
            regs[args[0]] = value(args[1]) >> value(args[2])
        elif op == "lop3.b32":  # 0xea: (a & b) | c
            assert args[4] == "0xea"
            regs[args[0]] = (value(args[1]) & value(args[2])) | value(args[3])
        elif op in ("fma.rn.f16x2", "mul.rn.f16x2"):
            a, b = (_halves(value(r)).astype(np.float64) for r in args[1:3])
            c = _halves(value(args[3])).astype(np.float64) if op.startswith("fma") else 0.0
            regs[args[0]] = _word(a * b + c)  # one rounding to fp16, as the fused instruction
        elif op == "cvt.f32.f16":
            regs[args[0]] = np.float32(regs[args[1]])
        elif op == "add.f32":
            regs[args[0]] = np.float32(regs[args[1]]) + np.float32(regs[args[2]])
        else:
            raise AssertionError(f"the emulator does not know {op}")
    return float(regs["$0"])


def step_dot(bits: int, words: np.ndarray, x: np.ndarray) -> float:
    """Run the PTX for a step (`bits` words, 32 inputs), packing x the way `_x_pair` does."""
    pack, operands = 32 // bits, {f"${w + 1}": int(words[w]) for w in range(bits)}
    half = pack // 2
    for w in range(bits):
        for j in range(half):
            register = f"${bits + 1 + w * half + j}"
            operands[register] = _word(np.array([x[w * pack + j], x[w * pack + j + half]]))
    return run_ptx(step_dot_ptx(bits), operands)


def random_step(bits: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`bits` random words and their 32 codes in input order."""
    words = rng.integers(0, 2**32, size=bits, dtype=np.uint64)
    return words, np.array([c for w in words for c in codes_of(int(w), bits)], dtype=np.float64)


def codes_of(word: int, bits: int) -> list[int]:
    return [(word >> (bits * j)) & ((1 << bits) - 1) for j in range(32 // bits)]


def uniform_step(bits: int, code: int) -> tuple[np.ndarray, np.ndarray]:
    """`bits` words holding `code` at every position, and their 32 codes."""
    word = sum(code << (bits * j) for j in range(32 // bits))
    return np.full(bits, word, dtype=np.uint64), np.full(32, float(code))


@pytest.mark.parametrize("bits", [2, 4])
def test_every_code_at_every_position_enters_the_sum_exactly(bits: int) -> None:
    """With one input at 1 and the rest 0, the result is that code times 2⁻⁶: every code value at
    every position, then random words (which catch a code paired with the wrong input)."""
    rng = np.random.default_rng(0)
    steps = [uniform_step(bits, code) for code in range(2**bits)] + [random_step(bits, rng) for _ in range(4)]
    for words, codes in steps:
        for k in range(32):
            x = np.zeros(32)
            x[k] = 1.0
            assert step_dot(bits, words, x) == codes[k] * 2.0**-CODE_SHIFT


@pytest.mark.parametrize("bits", [2, 4])
def test_random_words_give_the_dot_product_to_fp16_rounding(bits: int) -> None:
    rng = np.random.default_rng(1)
    for _ in range(20):
        words, codes = random_step(bits, rng)
        x = rng.standard_normal(32).astype(np.float16).astype(np.float64)
        want = float(x @ codes) * 2.0**-CODE_SHIFT
        scale = float(np.abs(x) @ codes) * 2.0**-CODE_SHIFT
        assert abs(step_dot(bits, words, x) - want) <= 16 * 2.0**-11 * scale  # 16 adds per lane


def test_outlier_inputs_stay_finite() -> None:
    """A whole step of inputs at 15,000 against the largest 4-bit code (LLaMA's outlier channels
    reach a few thousand, in a handful of channels)."""
    x = np.full(32, 15000.0)
    got = step_dot(4, np.full(4, 0xFFFFFFFF, dtype=np.uint64), x)
    assert np.isfinite(got) and abs(got - 32 * 15000.0 * 15 * 2.0**-CODE_SHIFT) <= 1e-2 * got
