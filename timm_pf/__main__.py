import sys

from timm_pf.cli import main

sys.exit(main())
