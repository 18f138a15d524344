"""The 7B build → run → validate → serve sequence on this machine, with torch bf16 eager and
llama.cpp Q4_0 side by side (issue 12). A thin wrapper over `convllava-export bench real-size`.

Usage: python benchmarks/real_size.py WORKDIR [--json benchmarks/results/real_size_7b.json] [more bench options]
Needs ~15 GB for the random vicuna-7b checkpoint (written once), ~40 GB of scratch at the
build's largest, and llama-cpp-python + gguf for the llama.cpp column. Takes ~30 min on 2 cores.
"""

import sys

from convllava_export.cli import cli

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        sys.exit(__doc__)
    cli(["bench", "real-size", "--workdir", sys.argv[1], *sys.argv[2:]])
