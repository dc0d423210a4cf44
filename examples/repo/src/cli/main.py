"""Command-line entry point for widgets."""
import sys


def main(argv):
    # XXX: no --help yet
    for name in argv[1:]:
        print(name)


if __name__ == "__main__":
    main(sys.argv)
