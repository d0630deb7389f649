"""`python -m data_tools COMMAND ...`; the commands are listed by `python -m data_tools --help`."""

import sys

from data_tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
