import sys

from engine.train.entry import main

sys.exit(main())
