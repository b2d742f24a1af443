import sys

from aa_deploy.cli import main

sys.exit(main())
