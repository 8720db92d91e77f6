"""The wheel ships every subpackage: an editable install would hide one missing from the list."""

import tomllib

from conftest import REPO


def test_every_subpackage_is_listed_in_pyproject():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(init.parent.relative_to(REPO).parts)
        for init in (REPO / "cocodc").rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    assert found <= listed, f"not in [tool.setuptools] packages: {sorted(found - listed)}"
    assert "cocodc.kernels" in listed
