from normopt.cli import main

main()
