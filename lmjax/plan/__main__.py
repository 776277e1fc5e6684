import sys

from lmjax.plan.planner import main

sys.exit(main())
