"""``python -m mailspool``: the same as the ``mailspool`` command."""

import sys

from mailspool.console import main

sys.exit(main())
