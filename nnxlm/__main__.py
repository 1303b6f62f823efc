import sys

from nnxlm.cli import main

sys.exit(main())
