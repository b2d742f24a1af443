"""`python -m aa_deploy` and the `aa-deploy` console script: the command line loaded under a guard, so that
Ctrl-C while its libraries load (torch and the subcommands: seconds) ends in one line and exit 130, as it
does later."""

import sys


def main() -> int:
    try:
        from aa_deploy.cli import main as run

        return run()
    except KeyboardInterrupt:
        print("aa-deploy: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
