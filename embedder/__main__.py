from embedder.cli import main

main()
