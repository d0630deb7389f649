import sys

from mymoe.convert.cli import main

sys.exit(main())
