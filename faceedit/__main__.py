import sys

from faceedit.cli import main

sys.exit(main())
