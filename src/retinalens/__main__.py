"""`python -m retinalens`: the command line, as torchrun's `-m retinalens` starts it on every rank."""

import sys

from .cli.main import main

sys.exit(main())
