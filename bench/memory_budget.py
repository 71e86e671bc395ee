"""`python -m bench.memory_budget`, the command docs/PERFORMANCE.md quotes: see bench/scenarios/memory_budget.py."""

import sys

from bench.scenarios.memory_budget import cli

if __name__ == "__main__":
    sys.exit(cli())
