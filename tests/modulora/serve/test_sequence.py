"""SequenceState, the one place a choice ends and its text is cut and streamed (engine and library)."""

from typing import Any

from modulora.serve.sequence import SequenceState, eos_token_ids
from modulora.serve.types import SamplingParams

TEXT = "Café au lait 😀 costs 3€; naïve? Yes."


def feed(tokenizer: Any, ids: list[int], **params: Any) -> tuple[SequenceState, list[str]]:
    """Append `ids` one by one until the state finishes; returns it and the streamed deltas."""
    state = SequenceState(
        0, [1], SamplingParams(temperature=0, **params), tokenizer, {tokenizer.eos_token_id}
    )
    deltas = []
    for token in ids:
        deltas.append(state.append(token))
        if state.finish_reason is not None:
            break
    return state, deltas


def test_deltas_concatenate_to_the_text_and_never_split_a_character(tokenizer) -> None:
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(TEXT.split()), "the emoji and accents should span several byte tokens"
    state, deltas = feed(tokenizer, ids, max_tokens=len(ids))
    assert "".join(deltas) == state.text == TEXT
    assert not any("\ufffd" in delta for delta in deltas)
    assert state.finish_reason == "length" and state.output_ids == ids


def test_stop_string_is_cut_and_never_streamed_in_part(tokenizer) -> None:
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    state, deltas = feed(tokenizer, ids, max_tokens=100, stop=["costs 3€"])
    assert "".join(deltas) == state.text == "Café au lait 😀 "
    assert state.finish_reason == "stop"
    assert not any("cost" in delta for delta in deltas)


def test_the_earliest_stop_string_wins_whatever_their_order(tokenizer) -> None:
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    # Both complete with the token that ends "lait"; "au lait" starts first.
    for stop in (["lait", "au lait"], ["au lait", "lait"]):
        state, deltas = feed(tokenizer, ids, max_tokens=100, stop=stop)
        assert "".join(deltas) == state.text == "Café "


def test_eos_ends_the_choice_without_joining_its_text(tokenizer) -> None:
    ids = tokenizer("Hello there", add_special_tokens=False)["input_ids"]
    state, deltas = feed(tokenizer, [*ids, tokenizer.eos_token_id, *ids], max_tokens=100, stop=["zzz"])
    assert state.finish_reason == "stop" and state.output_ids == ids
    assert "".join(deltas) == state.text == "Hello there"  # the held-back tail is flushed at EOS


def test_a_full_cache_ends_the_choice_for_length(tokenizer) -> None:
    state = SequenceState(0, [1], SamplingParams(temperature=0), tokenizer, set())
    state.append(tokenizer("Hi", add_special_tokens=False)["input_ids"][0], cache_full=True)
    assert state.finish_reason == "length"


def test_eos_ids_join_the_tokenizer_and_the_generation_config(tokenizer) -> None:
    class Config:
        eos_token_id = [7, 8]

    class Model:
        generation_config = Config()

    assert eos_token_ids(Model(), tokenizer) == {7, 8, tokenizer.eos_token_id}
    Config.eos_token_id = None
    assert eos_token_ids(Model(), tokenizer) == {tokenizer.eos_token_id}
