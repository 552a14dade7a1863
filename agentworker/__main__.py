import sys

from agentworker.cli import main

sys.exit(main())
