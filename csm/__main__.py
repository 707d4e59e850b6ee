"""``python -m csm`` (also ``accelerate launch -m csm``) runs the command line."""

from csm.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
