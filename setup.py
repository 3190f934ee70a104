"""Build script: the pure-Python package plus, where sources exist, the compiled extensions.

Install torch first, then ``pip install --no-build-isolation -e .`` (README explains why).
"""
from setuptools import setup

setup()
