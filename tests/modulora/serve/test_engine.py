"""The engine: greedy and seeded output equal to the library's, one base for many adapters, LRU, batching."""

import threading
from pathlib import Path
from typing import Any

import pytest

from modulora.generate import generate
from modulora.serve.events import DoneEvent, FinishEvent, TextEvent
from modulora.serve.types import EngineError, ModelSpec, SamplingParams

MESSAGES = [{"role": "user", "content": "Name three colours."}]
GREEDY = SamplingParams(max_tokens=12, temperature=0)


def spec(name: str, adapters: dict[str, tuple[Path, Any]]) -> ModelSpec:
    return ModelSpec(name, "tiny", adapters[name][0]) if name in adapters else ModelSpec(name, "tiny")


@pytest.mark.parametrize("name", ["tiny", "ft-a", "ft-c"])
def test_greedy_output_equals_library_generate_token_for_token(
    name: str, make_engine, adapters, tiny_base, tokenizer
) -> None:
    reference_model = adapters[name][1] if name in adapters else tiny_base
    texts, usage = make_engine().complete(spec(name, adapters), GREEDY, MESSAGES)
    expected = generate(reference_model, tokenizer, [MESSAGES], GREEDY)[0]
    assert texts == [expected.text]
    assert usage.completion_tokens == len(expected.token_ids) == GREEDY.max_tokens


def test_seeded_sampling_equals_library_generate(make_engine, adapters, tokenizer) -> None:
    """One sampler and one stop/EOS logic: the engine and the in-memory helper draw the same tokens."""
    params = SamplingParams(max_tokens=10, temperature=0.8, top_k=40, top_p=0.95, seed=11, n=2)
    texts, _ = make_engine().complete(spec("ft-a", adapters), params, MESSAGES)
    expected = generate(adapters["ft-a"][1], tokenizer, [MESSAGES], params)
    assert texts == [c.text for c in expected]
    assert texts[0] != texts[1]


def test_two_adapters_share_one_copy_of_the_base(make_engine, adapters) -> None:
    engine = make_engine()
    engine.complete(spec("ft-a", adapters), GREEDY, MESSAGES)
    base = engine.bases["tiny"]
    weights_before = {
        name: t.data_ptr() for name, t in base.decoder.model.state_dict().items() if "lora" not in name
    }
    engine.complete(spec("ft-b", adapters), GREEDY, MESSAGES)

    memory = engine.memory()
    assert list(engine.bases) == ["tiny"]
    assert memory["adapters"]["tiny"] == ["ft-a", "ft-b"]
    # Bank: the empty slot 0 plus one slot per adapter, all at the largest rank loaded (8).
    assert memory["adapter_banks"]["tiny"] == 3 * base.slot_bytes(8)
    held = memory["bases"]["tiny"] + memory["kv_cache"]["tiny"] + memory["adapter_banks"]["tiny"]
    assert memory["total"] == held + memory["workspace"]["tiny"]
    assert memory["adapter_banks"]["tiny"] < memory["bases"]["tiny"] / 10
    weights_after = {
        name: t.data_ptr() for name, t in base.decoder.model.state_dict().items() if "lora" not in name
    }
    assert weights_after == weights_before


def test_mixed_adapter_batch_equals_each_request_alone(make_engine, adapters) -> None:
    names = ["ft-a", "tiny", "ft-b", "ft-c"]
    alone = {name: make_engine().complete(spec(name, adapters), GREEDY, MESSAGES)[0] for name in names}

    engine = make_engine(max_batch_size=4)
    results: dict[str, list[str]] = {}
    threads = [
        threading.Thread(
            target=lambda n=n: results.__setitem__(n, engine.complete(spec(n, adapters), GREEDY, MESSAGES)[0])
        )
        for n in names
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == alone
    assert engine.stats["max_rows"] >= 2, "the requests should have shared decode steps"


def test_least_recently_used_adapter_is_evicted_under_the_budget(make_engine, adapters) -> None:
    probe = make_engine()
    probe.complete(spec("ft-b", adapters), GREEDY, MESSAGES)
    base = probe.bases["tiny"]
    # Room for the base, its cache, its working memory and a bank of three rank-8 slots (empty slot
    # + two adapters), which is also what the cache's sizing keeps free for adapters.
    bank = 3 * base.slot_bytes(8)
    budget = base.decoder.base_bytes + base.decoder.kv_cache_bytes + base.plan.workspace_bytes + bank
    engine = make_engine(memory_budget_bytes=budget, adapter_memory_bytes=bank)
    for name in ["ft-b", "ft-a", "ft-c"]:
        engine.complete(spec(name, adapters), GREEDY, MESSAGES)
    assert engine.memory()["adapters"]["tiny"] == ["ft-a", "ft-c"]
    assert engine.memory()["rows"]["tiny"] == probe.memory()["rows"]["tiny"] == 4
    assert engine.memory()["total"] <= budget

    texts, _ = engine.complete(spec("ft-b", adapters), GREEDY, MESSAGES)  # reloaded, evicts ft-a
    assert engine.memory()["adapters"]["tiny"] == ["ft-c", "ft-b"]
    assert texts == probe.complete(spec("ft-b", adapters), GREEDY, MESSAGES)[0]


def test_new_request_joins_a_running_batch(make_engine, adapters) -> None:
    engine = make_engine()
    long_events = engine.stream(
        spec("ft-a", adapters), SamplingParams(max_tokens=60, temperature=0), MESSAGES
    )
    next(e for e in long_events if isinstance(e, TextEvent))  # the long request is decoding
    short, _ = engine.complete(spec("ft-b", adapters), SamplingParams(max_tokens=3, temperature=0), MESSAGES)
    remaining = list(long_events)
    assert short and isinstance(remaining[-1], DoneEvent)
    assert any(isinstance(e, TextEvent) for e in remaining), "the short request finished before the long one"
    assert engine.stats["max_rows"] == 2


def test_stop_string_ends_the_choice_before_the_stop(make_engine, adapters) -> None:
    engine = make_engine()
    full, _ = engine.complete(spec("ft-a", adapters), GREEDY, MESSAGES)
    stop = full[0][5:8]
    params = SamplingParams(max_tokens=12, temperature=0, stop=[stop])
    events = list(engine.stream(spec("ft-a", adapters), params, MESSAGES))
    text = "".join(e.text for e in events if isinstance(e, TextEvent))
    assert text == full[0][: full[0].find(stop)]
    assert [e.finish_reason for e in events if isinstance(e, FinishEvent)] == ["stop"]


def test_seeded_sampling_repeats_and_choices_differ(make_engine, adapters) -> None:
    engine = make_engine()
    params = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=7, n=3)
    first, usage = engine.complete(spec("ft-a", adapters), params, "Once upon a time")
    again, _ = engine.complete(spec("ft-a", adapters), params, "Once upon a time")
    assert first == again
    assert len(set(first)) > 1
    assert usage.completion_tokens == 3 * 8


def test_prompt_longer_than_the_cache_is_an_error(make_engine, adapters) -> None:
    engine = make_engine(max_seq_len=16)
    with pytest.raises(EngineError, match="max_seq_len") as error:
        engine.complete(spec("tiny", adapters), GREEDY, "word " * 40)
    assert error.value.code == "context_length_exceeded"


def test_failing_listener_cancels_its_request_not_the_engine(make_engine, adapters) -> None:
    engine = make_engine()

    def closed_loop(event: object) -> None:
        raise RuntimeError("Event loop is closed")

    params = SamplingParams(max_tokens=50, temperature=0)
    request = engine.submit(spec("ft-a", adapters), params, MESSAGES, closed_loop)
    texts, usage = engine.complete(spec("ft-b", adapters), GREEDY, MESSAGES)
    assert request.cancelled
    assert usage.completion_tokens == GREEDY.max_tokens and texts[0]
