from microstructure.cli.main import main

main()
