"""``python -m blockllm ...`` is the ``blockllm`` command."""

import sys

from blockllm.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
