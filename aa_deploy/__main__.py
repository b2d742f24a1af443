import sys

from aa_deploy.entry import main

sys.exit(main())
