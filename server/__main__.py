from herald_presence.server.process.cli import main

if __name__ == "__main__":
    main()
