"""`python -m nnxlm`: the same program as the `nnxlm` command (nnxlm.launch.main)."""

import sys

from nnxlm.launch import main

if __name__ == "__main__":  # importing this module (pkgutil, a recipe's reference) runs nothing
    sys.exit(main())
