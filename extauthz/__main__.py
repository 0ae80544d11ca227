import sys

from extauthz.cli import main

sys.exit(main())
