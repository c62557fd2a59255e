from eqr.cli import main

main()
