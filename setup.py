"""Thin setuptools entry: every piece of metadata lives in pyproject.toml."""

from setuptools import setup

setup()
