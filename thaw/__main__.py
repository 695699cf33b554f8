from thaw.cli import main

main()
