"""Per-row LoRA: a batch mixing adapters equals each row run alone with the library's LoraLinear."""

import copy

import torch

from modulora.lora import LoraConfig, LoraLinear
from modulora.quant import QuantConfig, get_quantizer
from modulora.serve.multi_lora import LoraPlan, MultiLoraLinear


def make_base() -> torch.nn.Module:
    torch.manual_seed(0)
    return get_quantizer(QuantConfig(method="rtn", bits=4, group_size=32)).quantize(
        torch.randn(48, 64), None, None
    )


def random_lora(base: torch.nn.Module, r: int, seed: int) -> LoraLinear:
    layer = LoraLinear(copy.deepcopy(base), LoraConfig(r=r, alpha=16, dropout=0.0))
    generator = torch.Generator().manual_seed(seed)
    for weight in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
        weight.data = torch.randn(weight.shape, generator=generator)
    return layer


def load(bank: MultiLoraLinear, slot: int, lora: LoraLinear) -> None:
    bank.load_slot_(
        slot, lora.lora_A["default"].weight, lora.lora_B["default"].weight, lora.scaling["default"]
    )


def test_forward_mixed_batch_equals_each_row_alone() -> None:
    base = make_base()
    loras = {1: random_lora(base, r=4, seed=1), 2: random_lora(base, r=8, seed=2)}
    plan = LoraPlan()
    bank = MultiLoraLinear(base, plan, torch.float32, torch.device("cpu"))
    bank.resize_(3, 8)
    for slot, lora in loras.items():
        load(bank, slot, lora)
    x = torch.randn(4, 3, 64)
    slots = [1, 2, 0, 1]

    plan.set(slots, x.device)
    mixed = bank(x)

    for row, slot in enumerate(slots):
        expected = base(x[row : row + 1]) if slot == 0 else loras[slot](x[row : row + 1])
        plan.set([slot], x.device)
        torch.testing.assert_close(bank(x[row : row + 1]), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mixed[row : row + 1], expected, rtol=1e-5, atol=1e-5)


def test_resize_keeps_loaded_adapters_and_pads_rank_with_zeros() -> None:
    base = make_base()
    lora = random_lora(base, r=4, seed=3)
    plan = LoraPlan()
    bank = MultiLoraLinear(base, plan, torch.float32, torch.device("cpu"))
    bank.resize_(2, 4)
    load(bank, 1, lora)
    bank.resize_(5, 16)
    x = torch.randn(2, 1, 64)
    plan.set([1, 1], x.device)
    assert (bank.slots, bank.rank) == (5, 16)
    torch.testing.assert_close(bank(x), lora(x), rtol=1e-5, atol=1e-5)


def test_slot_zero_is_the_base_alone_bit_for_bit() -> None:
    base = make_base()
    plan = LoraPlan()
    bank = MultiLoraLinear(base, plan, torch.float32, torch.device("cpu"))
    bank.resize_(2, 4)
    load(bank, 1, random_lora(base, r=4, seed=4))
    x = torch.randn(3, 2, 64)
    plan.set([0, 0, 0], x.device)
    torch.testing.assert_close(bank(x), base(x), rtol=0, atol=0)
