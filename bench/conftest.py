import os
import sys

# The benchmark helpers (workload.py) live beside the benchmarks.
sys.path.insert(0, os.path.dirname(__file__))
