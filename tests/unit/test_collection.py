"""Every folder of tests is collected: pytest silently skips folders whose names match its
`norecursedirs` (the default holds `dist`, `build`, `venv`, ...), which once hid 34 tests."""

import fnmatch
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent.parent


def _test_folders() -> list[Path]:
    return sorted({p.parent for p in TESTS.rglob("test_*.py") if "__pycache__" not in p.parts})


@pytest.mark.timeout(30)
def test_no_test_folder_is_skipped_by_norecursedirs(pytestconfig):
    patterns = pytestconfig.getini("norecursedirs")
    hidden = [
        (str(folder.relative_to(TESTS)), pattern)
        for folder in _test_folders()
        for part in folder.relative_to(TESTS).parts
        for pattern in patterns
        if fnmatch.fnmatch(part, pattern)
    ]
    assert hidden == [], f"pytest would never collect these folders (folder, norecursedirs pattern): {hidden}"


@pytest.mark.timeout(30)
def test_every_test_folder_is_under_testpaths(pytestconfig):
    roots = [Path(pytestconfig.rootpath, p).resolve() for p in pytestconfig.getini("testpaths")]
    outside = [str(f) for f in _test_folders() if not any(f == r or r in f.parents for r in roots)]
    assert outside == [] and roots, f"testpaths {roots} misses {outside}"
    assert {f.name for f in _test_folders()} >= {"unit", "multiproc", "cli", "root"}
