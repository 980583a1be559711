import sys

from quota_compile.cli import main

sys.exit(main())
