"""The paper's entry point: `python3 run_classification.py --flag=value ...` runs `lcp train`."""

import sys

from cli import main

if __name__ == "__main__":
    main(["train", *sys.argv[1:]])
