"""python -m tm4.daemon: the same as tm4d."""

from tm4.daemon.main import main

if __name__ == "__main__":
    raise SystemExit(main())
