from ddnn_gen.cli import main

main()
