"""``python -m kronlink.cli``: what ``kronlink up`` and ``kronlink demo`` start their children with."""

import sys

from kronlink.cli import main

sys.exit(main())
