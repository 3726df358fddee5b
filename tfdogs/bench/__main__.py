"""`python -m tfdogs.bench`: see `tfdogs.bench`."""

from tfdogs.bench import main

main()
