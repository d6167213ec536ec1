"""`python -m judge_server --model M --constitution FILE` (the same as `cai judge serve`)."""

from cai.cli import app

if __name__ == "__main__":
    app(["judge", "serve"] + __import__("sys").argv[1:])
