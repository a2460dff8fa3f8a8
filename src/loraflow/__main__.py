"""`python -m loraflow`: the CLI, so `torchrun -m loraflow train` and `accelerate launch -m loraflow` work."""

from loraflow.cli import main

main()
