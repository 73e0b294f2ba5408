import sys

from bitpass.tools.cli import main

sys.exit(main())
