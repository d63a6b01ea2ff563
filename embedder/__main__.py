from embedder.cli import main

if __name__ == "__main__":  # decode processes are spawned: they re-import this module
    main()
