"""`python -m cai ...`: the same command line as `cai ...`."""

from cai.cli import app

if __name__ == "__main__":
    app(prog_name="cai")
