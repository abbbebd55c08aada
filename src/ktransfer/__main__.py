import sys

from ktransfer.cli import main

sys.exit(main())
