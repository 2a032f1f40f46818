import sys

from prefixserve.cli import main

sys.exit(main())
