"""``python -m data_tools.inspect``: the public name of ``data_tools.check_shards`` (DESIGN.md's command table).

The code lives in ``check_shards`` so that nothing imports a module that shadows the standard
library's ``inspect``; this file only keeps the documented command working.
"""

import sys

from data_tools.check_shards import main

if __name__ == "__main__":
    sys.exit(main())
