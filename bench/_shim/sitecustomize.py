"""Makes ``fdfast.kernels`` importable from a bare working tree (no pip install), as setup.py's package_dir does.

bench/gpu_check.sh puts this folder on PYTHONPATH only when ``import fdfast.kernels`` fails; Python runs this
file at start-up. The finder answers for ``fdfast.kernels`` (and its modules) only, after the normal finders.
"""
import importlib.abc
import importlib.util
import os
import sys

_KERNELS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "kernels")


class _KernelsFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "fdfast.kernels":
            return importlib.util.spec_from_file_location(name, os.path.join(_KERNELS, "__init__.py"),
                                                          submodule_search_locations=[_KERNELS])
        return None  # fdfast.kernels.* resolves through the package's __path__ set above


sys.meta_path.append(_KernelsFinder())
