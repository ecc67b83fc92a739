"""``python -m blockllm ...`` is the ``blockllm`` command."""

import sys

from blockllm.app.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
