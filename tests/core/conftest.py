from tests.api.conftest import service  # noqa: F401 - the in-process service fixture
