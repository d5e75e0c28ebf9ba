import sys

from post.cli import main

sys.exit(main())
