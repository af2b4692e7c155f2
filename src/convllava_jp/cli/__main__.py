"""`python -m convllava_jp.cli ...`, the same as the `convllava-jp` command."""

import sys

from . import main

sys.exit(main())
