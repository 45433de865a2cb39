"""Computes the package list so that `pip install .` ships every subpackage.

A hand-written list silently drops new subpackages from the wheel while editable installs
keep working; walking the two source roots cannot forget one.
"""
from setuptools import find_packages, setup

packages = ["mega"] + [f"mega.{p}" for p in find_packages("kernel")]
packages += ["mega.plugins"] + [f"mega.plugins.{p}" for p in find_packages("plugins")]

setup(packages=packages)
