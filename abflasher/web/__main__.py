import sys

from abflasher.web.main import main

sys.exit(main())
