import sys

from xdsplane.cli import main

sys.exit(main())
