from curvdiag.cli.app import main

main()
