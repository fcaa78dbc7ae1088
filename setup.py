"""Kept for stdeb (``setup.py --command-packages=stdeb.command bdist_deb``); metadata lives in setup.cfg."""

from setuptools import setup

setup()
