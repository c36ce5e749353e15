from dsnode.cli import main

main()
