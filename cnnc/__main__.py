import sys

from cnnc.cli.main import main

sys.exit(main())
