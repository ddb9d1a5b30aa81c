import sys

from liverus.cli import main

sys.exit(main())
