"""`python -m service` is `qbo-broker`."""

from service.cli import main

main()
