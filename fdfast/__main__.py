import sys

from fdfast.cli import main

sys.exit(main())
