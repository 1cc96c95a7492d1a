"""`python -m dsvlm` (what `accelerate launch -m dsvlm train ...` runs)."""

from dsvlm.cli.app import main

main()
