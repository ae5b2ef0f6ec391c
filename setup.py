"""Packaging: the top-level ``kernels/`` folder is installed as ``fdfast.kernels`` (never as ``kernels``)."""
from setuptools import find_packages, setup

packages = find_packages(include=["fdfast", "fdfast.*"])
setup(
    packages=packages + ["fdfast.kernels"],
    package_dir={"fdfast.kernels": "kernels"},
    package_data={"fdfast": ["recipes/*.yaml"], "fdfast.kernels": ["csrc/*"]},
    include_package_data=True,
)
