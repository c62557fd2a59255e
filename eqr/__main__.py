from eqr.commands import main

main()
