"""``python -m flashnorm_onnx.cli``: the same command line as ``flashnorm-onnx``."""

import sys

from flashnorm_onnx.cli import main

sys.exit(main())
