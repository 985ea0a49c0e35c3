"""The slow list of tests/conftest.py: a stale name would silently keep a slow test in `make test-fast`."""

import ast

from tests.conftest import ALL, ROOT, SLOW, is_slow


def test_every_slow_name_is_a_test_of_its_file():
    for file, names in SLOW.items():
        path = ROOT / "tests" / file
        assert path.is_file(), file
        if names != ALL:
            defined = {node.name for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.FunctionDef)}
            assert names <= defined, f"{file}: {sorted(names - defined)}"


def test_slow_matches_whole_files_and_every_parametrisation_of_a_name():
    assert is_slow("tests/test_ui_browser.py::test_anything")
    assert is_slow("tests/test_train.py::test_what_trains_is_configuration[lora]")
    assert not is_slow("tests/test_train.py::test_what_trains_is_configuration_fast")
    assert not is_slow("tests/test_windows.py::test_plan")
