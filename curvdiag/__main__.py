from curvdiag.cli import main

main()
