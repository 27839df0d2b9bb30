"""One root for the project's errors: a caller catches ours with one except, and built-in handlers still work."""

import importlib
import inspect
import pkgutil

import histo_assets
from histo_assets.core.errors import HistoAssetsError


def project_exceptions() -> dict[str, type]:
    found = {}
    for module_info in pkgutil.walk_packages(histo_assets.__path__, "histo_assets."):
        module = importlib.import_module(module_info.name)
        for name, value in vars(module).items():
            if inspect.isclass(value) and issubclass(value, BaseException) and value.__module__ == module.__name__:
                found[f"{module.__name__}.{name}"] = value
    return found


def test_every_error_the_project_defines_derives_from_the_one_root():
    exceptions = project_exceptions()
    assert len(exceptions) >= 13
    outside = sorted(name for name, cls in exceptions.items() if not issubclass(cls, HistoAssetsError))
    assert outside == [], outside


def test_errors_keep_their_built_in_kind():
    from histo_assets.core.lineage import LineageNotFound
    from histo_assets.params import ParamsError

    assert issubclass(ParamsError, ValueError) and issubclass(LineageNotFound, LookupError)
