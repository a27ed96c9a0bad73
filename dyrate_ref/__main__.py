from .cli import main

main(prog="python -m dyrate_ref")
