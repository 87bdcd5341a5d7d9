"""Library settings: the storage root and the two functions that record paths relative to it."""

from pathlib import Path

import pytest

from modulora.settings import from_home, get_settings, relative_to_home


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MODULORA_HOME", str(tmp_path / "home"))
    get_settings.cache_clear()
    yield tmp_path / "home"
    get_settings.cache_clear()


def test_folders_under_home(home: Path) -> None:
    assert get_settings().models_dir == home / "models" and get_settings().bases_dir == home / "bases"


def test_a_folder_under_home_is_recorded_relative_and_read_back_absolute(home: Path) -> None:
    base = home / "bases" / "m-rtn-4b-g128-abc"
    base.mkdir(parents=True)
    assert relative_to_home(base) == "bases/m-rtn-4b-g128-abc"
    assert from_home(relative_to_home(base)) == str(base)


def test_other_references_pass_through_both_ways(home: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    for ref in ("smollm2-135m-instruct", "smollm2-135m-instruct:gguf", str(outside)):
        assert relative_to_home(ref) == ref and from_home(ref) == ref
    assert from_home("bases/not-built-yet") == "bases/not-built-yet"  # only existing folders resolve
    assert from_home("") == ""
