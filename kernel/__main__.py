"""`python -m mega ...` is the same as the `mega` command."""
import sys

from mega.cli import main

sys.exit(main())
