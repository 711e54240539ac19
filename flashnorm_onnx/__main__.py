"""``python -m flashnorm_onnx``: the same command line as ``flashnorm-onnx``."""

import sys

from flashnorm_onnx.cli import main

if __name__ == "__main__":
    sys.exit(main())
