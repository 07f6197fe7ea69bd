"""Benchmarks and research runners: commands that measure the product (see README.md here).

Every one of them loads diffusers or transformers, most at import, so the package drops the library
notices nobody can act on before any of its modules loads (``instantstyle.quiet``).
"""

from instantstyle.quiet import quiet_libraries

quiet_libraries()
