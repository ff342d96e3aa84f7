# All metadata lives in setup.cfg; this file lets older tools install us.
from setuptools import setup

setup()
