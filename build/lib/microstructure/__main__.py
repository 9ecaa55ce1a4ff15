from microstructure.cli import main

main()
